"""benchmarks/gpu_check.sh, the GPU machine's checks: here (no CUDA) it must parse, say it
skipped, and succeed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs for real")
def test_gpu_check_parses_and_skips_without_cuda(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path)],
                       capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr
    assert "GPU checks skipped" in r.stdout
    assert (tmp_path / "SKIPPED").exists()


def test_gpu_check_py_without_cuda_measures_nothing(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("with CUDA it measures")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "no CUDA device" in r.stderr
    assert not (tmp_path / "codec_cuda.json").exists()
