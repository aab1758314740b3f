"""epost.tap: twistd command line -> Config, and a clean exit on bad values."""

from __future__ import annotations

import pytest

from epost.config import HostPort
from epost.tap import Options, config_from_options, makeService


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_repeatable_flags_collect_every_value():
    options = parse(
        "--relay", "tcp:1025", "--relay", "tcp:1026",
        "--local-domain", "a.test", "--local-domain", "b.test",
        "--relay-network", "10.0.0.0/8", "--dns-server", "192.0.2.53",
        "--submission", "tcp:1587", "--smtps", "tcp:1465", "--admin", "tcp:1080",
    )
    assert options["relay"] == ["tcp:1025", "tcp:1026"]
    assert options["local_domain"] == ["a.test", "b.test"]
    assert options["relay_network"] == ["10.0.0.0/8"]
    assert options["dns_server"] == ["192.0.2.53"]
    assert (options["submission"], options["smtps"], options["admin"]) == (
        ["tcp:1587"], ["tcp:1465"], ["tcp:1080"],
    )


def test_options_become_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = config_from_options(parse(
        "--hostname", "mx.example.test", "--relay", "tcp:1025", "--relay", "tcp:1026",
        "--forward-all", "--retry-fixed", "--retry-interval", "60",
        "--retry-period-4xx", "2h", "--smtp-gateway", "smtp.isp.test:2525",
        "--spool", "spool", "--gateway-table", "gw.dat", "--local-domain", "a.test",
        "--retry-count-5xx", "0", "--retry-period-noanswer", "1d",
        "--connect-timeout", "5", "--greeting-timeout", "6",
    ))
    assert config.server.hostname == "mx.example.test"
    assert config.server.relay == ("tcp:1025", "tcp:1026")
    assert config.server.submission == ("tcp:587",)
    assert config.server.spool == tmp_path / "spool"
    assert config.routing.gateway_table == tmp_path / "gw.dat"
    assert config.routing.forward_all_to_gateway is True
    assert config.routing.smtp_gateway == HostPort("smtp.isp.test", 2525)
    assert config.routing.local_domains == ("a.test",)
    assert config.retry.fixed_interval is True
    assert (config.retry.interval, config.retry.period_4xx) == (60, 7200)
    assert (config.retry.count_5xx, config.retry.period_noanswer) == (0, 86400)
    assert (config.delivery.connect_timeout, config.delivery.greeting_timeout) == (5, 6)


def test_config_flag_reads_file(tmp_path):
    path = tmp_path / "epost.toml"
    path.write_text('[server]\nhostname = "file.test"\nrelay = ["tcp:2525"]\n')
    config = config_from_options(parse("--config", str(path), "--relay", "tcp:3525"))
    assert config.server.hostname == "file.test"
    assert config.server.relay == ("tcp:3525",)
    assert config.source == path
    assert config.retry.fixed_interval is False  # unset optFlags are 0: not given
    assert config.routing.forward_all_to_gateway is False


def test_help_documents_every_spec_flag():
    text = str(Options())
    for flag in [
        "--config", "--relay", "--submission", "--smtps", "--admin", "--hostname", "--spool",
        "--gateway-table", "--smtp-gateway", "--forward-all", "--local-domain",
        "--relay-network", "--dns-server", "--retry-interval", "--retry-fixed",
        "--retry-count-5xx", "--retry-period-4xx", "--retry-period-noanswer",
        "--connect-timeout", "--greeting-timeout",
    ]:
        assert flag in text
    assert text.count("default") >= 20


def test_make_service_bad_flag_exits_with_one_line(capsys):
    options = parse("--hostname", "mx.example.test", "--retry-interval", "abc")
    with pytest.raises(SystemExit) as info:
        makeService(options)
    assert info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert err == "epost: --retry-interval: must be a positive integer, got 'abc'\n"


def test_make_service_missing_config_exits_with_one_line(tmp_path, capsys):
    options = parse("--config", str(tmp_path / "missing.toml"))
    with pytest.raises(SystemExit) as info:
        makeService(options)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("epost: ") and err.count("\n") == 1


@pytest.mark.parametrize("damage", ["not a database", "newer version"])
def test_make_service_with_a_queue_store_it_cannot_open_exits_with_one_line(tmp_path, capsys, damage):
    """Never a silently new, empty queue: the daemon stops, naming the file and why."""
    import sqlite3

    from epost.store.database import QueueStore

    database = tmp_path / "spool" / "queue" / "queue.db"
    if damage == "not a database":
        database.parent.mkdir(parents=True)
        database.write_bytes(b"these are not the pages you are looking for" * 200)
    else:
        store = QueueStore(tmp_path / "spool")
        store.open()
        store.close()
        with sqlite3.connect(database) as db:
            db.execute("PRAGMA user_version = 99")
        db.close()
    before = database.read_bytes()
    options = parse("--hostname", "mx.example.test", "--spool", str(tmp_path / "spool"),
                    "--relay", "tcp:0:interface=127.0.0.1", "--submission", "tcp:0:interface=127.0.0.1")
    with pytest.raises(SystemExit) as info:
        makeService(options)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"epost: {database}: ") and err.count("\n") == 1
    assert database.read_bytes() == before  # left as it was, for the operator
