"""Rate accounting: what tensors cost in bits, measured, predicted and differentiable.

Split by concern (arXiv 2506.00486, Sec. 3-4):

- :mod:`.bits`: bit counting of integer symbols (FL, EG, Huffman, entropy; the ``se(v)``
  map) and of the codec's own frames (:func:`codec_bits`).
- :mod:`.model`: the GG model's expected bits, the step for a target rate, and the step
  table the transports read (:func:`model_step`).
- :mod:`.differentiable`: rates with gradients, for rate-constrained training.

The quantizer itself is :func:`ggcomm.quant.quantize` (also here as :func:`quantize`), and
how a transport chooses its step is :mod:`ggcomm.step_policy`. Every name below is importable
from ``ggcomm.rate`` as before the split.
"""

from ..quant import quantize, rms
from . import bits, differentiable, model
from .bits import *  # noqa: F403  (each submodule's __all__)
from .differentiable import *  # noqa: F403
from .model import *  # noqa: F403

__all__ = ["quantize", "rms", *bits.__all__, *differentiable.__all__, *model.__all__]
