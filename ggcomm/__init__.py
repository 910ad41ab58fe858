"""ggcomm: generalized-Gaussian-aware compression of what distributed training sends.

Gradients, activations and weights of large models are generalized-Gaussian with shape
below 2; quantized and Exp-Golomb-coded they take a few bits per element on the wire.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from ._parallel import get_num_threads, set_num_threads
from .codec import (
    DEFAULT_BLOCK_SIZE,
    BlockInfo,
    Frame,
    FrameInfo,
    decode,
    encode,
    inspect,
)
from .errors import FrameError, GGCommError

__version__ = "0.1.0"

# Submodules load on first use: `import ggcomm` stays cheap for a training script that
# only needs the codec, and `ggcomm.gg.fit(...)` still works without its own import.
_SUBMODULES = {"codec", "ddp", "deepspeed", "diloco", "errors", "exchange", "fsdp", "gg",
               "kernels", "methods", "pipeline", "pipelining", "powersgd", "quant", "rate",
               "rf8", "step_policy", "tools", "weights"}

# Modules that moved into a wing keep their former names: `import ggcomm.act` and
# `from ggcomm.workload import GPT` give the module itself (one object under two names).
_MOVED = {
    "init": "ggcomm.methods.init",
    "act": "ggcomm.methods.act",
    "gct": "ggcomm.methods.gct",
    "backslash": "ggcomm.methods.backslash",
    "deepshape": "ggcomm.methods.deepshape",
    "cli": "ggcomm.tools.cli",
    "demo": "ggcomm.tools.demo",
    "bench": "ggcomm.tools.bench",
    "analyze": "ggcomm.tools.analyze",
    "workload": "ggcomm.tools.workload",
    "stepping": "ggcomm.step_policy",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``ggcomm.<former name>`` as the module at its new place."""

    def find_spec(self, fullname, path=None, target=None):
        head, _, tail = fullname.partition(".")
        if head == __name__ and tail in _MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module(_MOVED[spec.name.partition(".")[2]])
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # The import system has just set the alias's spec on the real module: give it back
        # its own, so that its __spec__ (reload, pickling by name) still names its place.
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())


def __getattr__(name: str):
    if name in _SUBMODULES or name in _MOVED:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "BlockInfo",
    "Frame",
    "FrameError",
    "FrameInfo",
    "GGCommError",
    "__version__",
    "decode",
    "encode",
    "get_num_threads",
    "inspect",
    "set_num_threads",
]
