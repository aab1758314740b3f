import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fakes.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))  # e2e_support.py


import pytest  # noqa: E402

from web_support import make_world  # noqa: E402


@pytest.fixture
def world(tmp_path):
    """A Mail Control site over real files, a fake manager and a Clock (web_support.make_world)."""
    return make_world(tmp_path)


@pytest.fixture
def admin(world):
    """A client logged in as the admin."""
    client = world.client()
    assert client.login().code == 303
    return client
