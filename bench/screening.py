"""Daemon CPU and EHLO latency per relay connection, screening off vs 4 DNSBL zones on dnsmasq.
Run from the checkout: .venv/bin/python bench/screening.py"""
import os, socket, statistics, sys, tempfile, time
from pathlib import Path
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests/e2e"), str(REPO / "tests/routing")]
from e2e_support import daemons
from dnsmasq import Dnsmasq

def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

def reply(s):
    data = b""
    while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] == b"-":
        data += s.recv(4096)
    return data

def run(d, sources):
    lat = []
    c0 = cpu(d.pid)
    for src in sources:
        s = socket.create_connection(("127.0.0.1", d.relay_port), source_address=(src, 0))
        reply(s)
        t = time.perf_counter(); s.sendall(b"EHLO c.example\r\n"); r = reply(s); lat.append(time.perf_counter() - t)
        assert r.startswith(b"250"), r
        s.sendall(b"QUIT\r\n"); reply(s); s.close()
    return (cpu(d.pid) - c0) / len(sources) * 1000, statistics.median(lat) * 1000, sorted(lat)[int(len(lat) * .99)] * 1000

N = 500
sources = [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(N)]
dns = Dnsmasq(["--host-record=2.0.0.127.zen.example.test,127.0.0.2"], zone="example.test"); dns.start()
gen = daemons(Path(tempfile.mkdtemp()))
make = next(gen)
zones = ", ".join(f'"{z}.example.test"' for z in ("zen", "bl", "b", "list"))
for name, server in (("off", 'relay_networks = ["192.0.2.0/24"]'),
                     ("4 zones", f'relay_networks = ["192.0.2.0/24"]\ndnsbl = [{zones}]')):
    d = make(server=server, toml=f'dns_servers = ["127.0.0.1:{dns.port}"]')
    run(d, sources[:50])  # warm up
    for label, srcs in (("uncached", sources[50:]), ("cached", sources[50:])):
        if name == "off" and label == "cached": continue
        ms, med, p99 = run(d, srcs)
        print(f"{name:8} {label:9} daemon CPU {ms:.2f} ms/connection, EHLO latency median {med:.2f} ms p99 {p99:.2f} ms ({len(srcs)} connections)")
    d.stop()
dns.cleanup()
