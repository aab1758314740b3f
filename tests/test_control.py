"""The control socket's service: served whatever a dead daemon left behind (issue 18, finding 6)."""

from __future__ import annotations

import os
import socket

from twisted.internet.testing import MemoryReactor

from epost.control import control_service, remove_leftovers


def leave_a_dead_daemons_socket_and_lock(spool, pid: int) -> None:
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(spool / "control.sock"))
    leftover.close()
    os.symlink(str(pid), spool / "control.sock.lock")  # Twisted's wantPID lock, naming a live process


def test_the_control_socket_replaces_leftovers_and_takes_no_pid_lock(tmp_path):
    leave_a_dead_daemons_socket_and_lock(tmp_path, os.getpid())
    reactor = MemoryReactor()
    control_service(tmp_path, manager=None, reactor=reactor).privilegedStartService()
    assert not os.path.lexists(tmp_path / "control.sock") and not os.path.lexists(tmp_path / "control.sock.lock")
    [(path, _factory, _backlog, mode, want_pid)] = reactor.unixServers
    assert (path, mode, want_pid) == (str(tmp_path / "control.sock"), 0o600, False)


def test_only_a_socket_and_a_lock_link_count_as_leftovers(tmp_path):
    (tmp_path / "control.sock").write_text("not ours")
    (tmp_path / "control.sock.lock").write_text("not ours either")
    remove_leftovers(tmp_path / "control.sock")
    assert (tmp_path / "control.sock").read_text() == "not ours"
    assert (tmp_path / "control.sock.lock").read_text() == "not ours either"
