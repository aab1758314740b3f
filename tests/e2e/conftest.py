"""The `daemon` fixture: starts the real `twistd -n epost` on loopback ports, stops it afterwards."""

import pytest

from e2e_support import Daemon, free_port, write_config


@pytest.fixture
def daemon(tmp_path):
    """daemon(server="key = value lines for [server]", toml="more sections", args=[...], start=True) -> Daemon."""
    started: list[Daemon] = []

    def make(server: str = "", toml: str = "", args: list[str] = (), start: bool = True, **kwargs) -> Daemon:
        folder = tmp_path / f"d{len(started)}" if started else tmp_path
        folder.mkdir(exist_ok=True)
        relay, submission = free_port(), free_port()
        config = write_config(folder, relay, submission, server, toml)
        d = Daemon(folder, config, relay, submission, list(args), **kwargs)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        d.stop()
