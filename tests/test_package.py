"""The package's public surface: every submodule the README names is reachable from
``import ggcomm`` alone, and the exception family is one tree."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ggcomm
import ggcomm.errors

# every module the README names as ggcomm.<name>
DOCUMENTED = ["act", "analyze", "backslash", "bench", "codec", "ddp", "deepspeed", "demo",
              "errors", "gct", "gg", "init", "kernels", "pipeline", "pipelining", "rate",
              "stepping", "workload"]


@pytest.mark.parametrize("name", DOCUMENTED)
def test_the_lazy_loader_serves_every_documented_submodule(name):
    # called directly: an attribute another import already set would hide a missing name
    assert ggcomm.__getattr__(name).__name__ == f"ggcomm.{name}"


def test_submodules_load_on_first_use_in_a_fresh_interpreter():
    code = ("import ggcomm; assert ggcomm.deepspeed.__name__ == 'ggcomm.deepspeed'; "
            "ggcomm.ddp.GGCommState; ggcomm.pipeline.PipeComm")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_every_error_is_a_ggcomm_error_and_keeps_its_builtin_base():
    for name in ggcomm.errors.__all__:
        cls = getattr(ggcomm.errors, name)
        assert issubclass(cls, ggcomm.GGCommError)
        if cls is not ggcomm.GGCommError:
            assert issubclass(cls, (ValueError, RuntimeError)), name
    from ggcomm.codec import FrameError
    from ggcomm.ddp import SettingsMismatchError
    from ggcomm.pipeline import PipeLinkError, PipeSettingsError
    assert FrameError is ggcomm.FrameError is ggcomm.errors.FrameError
    assert SettingsMismatchError is ggcomm.errors.SettingsMismatchError
    assert PipeSettingsError is ggcomm.errors.PipeSettingsError
    assert PipeLinkError is ggcomm.errors.PipeLinkError
