"""A minimal SMTP server on loopback that accepts everything and keeps what it received (for the browser test)."""

from __future__ import annotations

import socketserver
import threading


class _Handler(socketserver.StreamRequestHandler):
    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")

    def handle(self) -> None:
        sink: SMTPSink = self.server.sink  # type: ignore[attr-defined]
        self.reply("220 sink.test ESMTP")
        recipients: list[str] = []
        while line := self.rfile.readline():
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                self.reply("250 sink.test")
            elif verb == b"MAIL":
                recipients = []
                self.reply("250 2.1.0 Ok")
            elif verb == b"RCPT":
                recipients.append(line.decode("ascii", "replace").partition("<")[2].partition(">")[0])
                self.reply("250 2.1.5 Ok")
            elif verb == b"DATA":
                self.reply("354 go ahead")
                data = b""
                while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                    data += chunk
                with sink.lock:
                    sink.received.append((tuple(recipients), data))
                self.reply("250 2.0.0 Ok: kept")
            elif verb == b"QUIT":
                self.reply("221 2.0.0 Bye")
                return
            else:
                self.reply("250 Ok")


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class SMTPSink:
    """`with SMTPSink(port) as sink:` ... `sink.received` is [(recipients, data)]."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[tuple[tuple[str, ...], bytes]] = []
        self.lock = threading.Lock()
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.sink = self  # type: ignore[attr-defined]

    def __enter__(self) -> SMTPSink:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def recipients(self) -> list[str]:
        with self.lock:
            return [r for recipients, _ in self.received for r in recipients]
