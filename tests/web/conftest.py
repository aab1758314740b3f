import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fakes.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))  # e2e_support.py
