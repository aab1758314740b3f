"""records.memoized: one DNS question per (name, type) for a run, whichever thread asks."""

from __future__ import annotations

import threading

from epost.routing.records import memoized


def test_threads_asking_the_same_name_wait_for_one_answer_and_other_names_go_in_parallel():
    asked: list[tuple[str, str]] = []
    b_inside = threading.Event()
    met: list[bool] = []

    def slow(name: str, rdtype: str) -> list:
        asked.append((name, rdtype))
        if name == "b.test":
            b_inside.set()
        else:  # a.test is answered only once b.test is being asked too: in parallel, or never
            met.append(b_inside.wait(5))
        return [f"{name} {rdtype}"]

    lookup = memoized(slow)
    answers: list[list] = []
    threads = [threading.Thread(target=lambda n=n: answers.append(lookup(n, "TXT")))
               for n in ("a.test", "A.test.", "b.test", "a.test", "b.test.", "a.test")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(asked) == [("a.test", "TXT"), ("b.test", "TXT")]  # each once, for six askers
    assert sorted(map(tuple, answers)) == [("a.test TXT",)] * 4 + [("b.test TXT",)] * 2
    assert met == [True]  # b.test was asked while a.test's question was still open


def test_a_failure_is_asked_again():
    calls = []

    def failing_once(name: str, rdtype: str) -> list:
        calls.append(name)
        if len(calls) == 1:
            raise TimeoutError("no answer")
        return ["ok"]

    lookup = memoized(failing_once)
    try:
        lookup("c.test", "MX")
    except TimeoutError:
        pass
    assert lookup("c.test", "MX") == ["ok"] and calls == ["c.test", "c.test"]
