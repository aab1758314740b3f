"""The e2e harness itself: a daemon that lost a port between free_port() and its bind starts on fresh ones."""

from __future__ import annotations

import socket

import pytest

from e2e_support import port_answers


@pytest.mark.parametrize("lost, behind_haproxy", [("submission_port", False), ("relay_port", True)])
def test_a_first_start_that_lost_a_port_moves_to_free_ones(daemon, lost, behind_haproxy):
    d = daemon(start=False)
    if behind_haproxy:  # as test_haproxy_e2e's nodes are configured
        d.config.write_text(d.config.read_text().replace('relay = ["tcp:', 'relay = ["haproxy:tcp:', 1))
    port = getattr(d, lost)
    with socket.socket() as taken:  # bound, not listening: as a connection's own port would be
        taken.bind(("127.0.0.1", port))
        d.start()

        assert getattr(d, lost) != port
        assert port_answers(d.relay_port) and port_answers(d.submission_port)
        assert f"epost: cannot listen on 127.0.0.1:{port}" in d.log.read_text()
        assert f"tcp:{d.relay_port}:" in d.config.read_text() and f"tcp:{d.submission_port}:" in d.config.read_text()
