"""Shared test set-up."""

import os

import pytest
from hypothesis import settings

# CI machines are slow and noisy: no per-example deadline.
settings.register_profile("ci", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _run_in_a_temporary_folder(tmp_path, monkeypatch):
    """trial's mktemp() and relative paths land in a throw-away folder."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def spool(tmp_path):
    """An opened spool with its queue store, for tests that call its blocking methods (no reactor)."""
    from epost.store.spool import Spool

    spool = Spool(tmp_path, reactor=None, threadpool=None)
    spool.open()
    yield spool
    spool.close()


LOG_LINES = 80  # of each daemon's log, added to a failed test's report


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that started real daemons (tests/e2e, tests/stress) reports
    the end of each one's log: a CI failure then says what the daemon saw."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for daemon in getattr(item, "epost_daemons", ()):
            try:
                lines = daemon.log.read_text(errors="replace").splitlines()[-LOG_LINES:]
            except OSError as e:
                lines = [f"(unreadable: {e})"]
            report.sections.append((f"daemon log {daemon.log}", "\n".join(lines)))
