"""The control channel's Route command (epost route via the daemon), over an in-memory AMP connection."""

from __future__ import annotations

import os

from fakes import ClockReactor, SynchronousThreadPool
from twisted.internet.protocol import Factory
from twisted.protocols import amp
from twisted.test.iosim import connectedServerAndClient

from epost.config import load_config
from epost.control import ControlProtocol, Route, RouteAnswers
from epost.routing_chain import build_routing


def routing_for(tmp_path):
    (tmp_path / "users").write_text("alice@example.test\n")
    (tmp_path / "aliases").write_text("info: alice@example.test\n")
    config_path = tmp_path / "epost.toml"
    config_path.write_text(
        '[server]\nhostname = "mx.example.test"\n'
        '[routing]\nlocal_domains = ["example.test"]\nusers = "users"\naliases = "aliases"\n'
    )
    return build_routing(load_config(config_path, {}))


def ask(routing, address: str) -> dict:
    factory = Factory.forProtocol(lambda: ControlProtocol(manager=None))
    factory.answer_route = RouteAnswers(routing, (), ClockReactor(), SynchronousThreadPool())
    client, server, pump = connectedServerAndClient(lambda: factory.buildProtocol(None), amp.AMP)
    answers = []
    client.callRemote(Route, address=address, dns=False).addBoth(answers.append)
    pump.flush()
    (answer,) = answers
    if not isinstance(answer, dict):
        answer.raiseException()
    return answer


def test_route_is_answered_from_the_tables_in_force_in_the_spec_format(tmp_path):
    routing = routing_for(tmp_path)
    assert ask(routing, "info@example.test") == {
        "lines": ["info@example.test: alias via aliases:1 -> alice@example.test",
                  "alice@example.test: local via local -> mailbox example.test/alice"],
        "status": 0,
        "notes": [],
    }
    assert ask(routing, "eve@example.test")["status"] == 1


def test_a_table_whose_file_changed_gets_a_note_and_the_old_table_still_answers(tmp_path):
    routing = routing_for(tmp_path)
    users = tmp_path / "users"
    users.write_text("bob@example.test\n")
    os.utime(users, ns=(10**9, 10**9))
    answer = ask(routing, "alice@example.test")
    assert answer["lines"] == ["alice@example.test: local via local -> mailbox example.test/alice"]
    (note,) = answer["notes"]
    assert note.startswith(f"note: {users} on disk differs from the table in use (loaded ")
    assert note.endswith("the file on disk changed and is loaded once it has not changed for a second)")
