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
