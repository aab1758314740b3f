"""The e2e harness itself: a daemon that lost a port between free_port() and its bind starts on fresh ones."""

from __future__ import annotations

import socket

from e2e_support import port_answers


def test_a_first_start_that_lost_a_port_moves_to_free_ones(daemon):
    d = daemon(start=False)
    lost = d.submission_port
    with socket.socket() as taken:  # bound, not listening: as a connection's own port would be
        taken.bind(("127.0.0.1", lost))
        d.start()

        assert d.submission_port != lost
        assert port_answers(d.relay_port) and port_answers(d.submission_port)
        assert f"epost: cannot listen on 127.0.0.1:{lost}" in d.log.read_text()
        assert f'"tcp:{d.submission_port}:' in d.config.read_text()
