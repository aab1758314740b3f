"""The `daemon` fixture: starts the real `twistd -n epost` on loopback ports, stops it afterwards."""

import pytest

from e2e_support import daemons


@pytest.fixture
def daemon(tmp_path, request):
    """daemon(server="key = value lines for [server]", toml="more sections", args=[...], start=True) -> Daemon."""
    yield from daemons(tmp_path, request.node)
