"""The stress suite's one knob: a short form in every run, the full form with STRESS=1.

A module of its own, not conftest: several conftest.py files share that module
name, so `from conftest import ...` could find another folder's."""

import os

FULL = os.environ.get("STRESS") == "1"


def scale(short, full):
    """`full` under STRESS=1, else `short`: one test, two sizes."""
    return full if FULL else short
