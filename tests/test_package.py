"""The package's public surface: every submodule the README names is reachable from
``import ggcomm`` alone, and the exception family is one tree."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ggcomm
import ggcomm.errors

# every module the README names as ggcomm.<name>, and where it lives
DOCUMENTED = {name: f"ggcomm.{name}" for name in (
    "codec", "ddp", "deepspeed", "diloco", "errors", "exchange", "fsdp", "gg", "kernels",
    "methods", "pipeline", "pipelining", "powersgd", "quant", "rate", "rf8", "step_policy",
    "tools", "weights")}
# former names of modules that moved into a wing
MOVED = {"init": "ggcomm.methods.init", "act": "ggcomm.methods.act",
         "gct": "ggcomm.methods.gct", "backslash": "ggcomm.methods.backslash",
         "cli": "ggcomm.tools.cli", "demo": "ggcomm.tools.demo", "bench": "ggcomm.tools.bench",
         "analyze": "ggcomm.tools.analyze", "workload": "ggcomm.tools.workload",
         "stepping": "ggcomm.step_policy"}


@pytest.mark.parametrize("name", [*DOCUMENTED, *MOVED])
def test_the_lazy_loader_serves_every_documented_submodule(name):
    # called directly: an attribute another import already set would hide a missing name
    assert ggcomm.__getattr__(name).__name__ == {**DOCUMENTED, **MOVED}[name]


def test_former_module_names_import_the_moved_modules_themselves():
    code = ("import importlib, sys\n"
            "import ggcomm.act, ggcomm.methods.act\n"
            "from ggcomm.workload import GPT\n"
            "from ggcomm.init import apply_gg_init\n"
            "assert ggcomm.act is ggcomm.methods.act is sys.modules['ggcomm.act']\n"
            "assert ggcomm.act.__spec__.name == 'ggcomm.methods.act'\n"
            "assert GPT.__module__ == 'ggcomm.tools.workload'\n"
            "importlib.reload(ggcomm.act)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    with pytest.raises(ModuleNotFoundError):
        import ggcomm.no_such_module  # noqa: F401


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
