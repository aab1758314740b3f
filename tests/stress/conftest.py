"""Stress scenarios: every test here is marked `stress`. CI runs the short
form; `STRESS=1 bash scripts/test.sh tests/stress` runs the full one."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from e2e_support import daemons  # noqa: E402


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.stress)


@pytest.fixture
def daemon(tmp_path, request):
    """As in tests/e2e: daemon(server=..., toml=..., args=[...]) -> a started Daemon."""
    yield from daemons(tmp_path, request.node)
