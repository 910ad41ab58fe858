"""ggcomm: generalized-Gaussian-aware compression of what distributed training sends.

Gradients, activations and weights of large models are generalized-Gaussian with shape
below 2; quantized and Exp-Golomb-coded they take a few bits per element on the wire.
"""

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
_SUBMODULES = {"act", "analyze", "backslash", "bench", "codec", "ddp", "deepspeed", "demo",
               "errors", "gct", "gg", "init", "kernels", "pipeline", "pipelining", "rate",
               "stepping", "workload"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        import importlib

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
