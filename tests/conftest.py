import importlib
import sys
from pathlib import Path

import pytest

# spawned ranks import the worker functions from this folder
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def benchmark_script():
    """``benchmark_script("name")`` imports ``benchmarks/name.py`` (which imports its
    siblings, such as ``_runs``, by name); the folder leaves sys.path after the test."""
    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, folder)
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(folder)
