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
from .bits import (
    MAX_AUTO_K,
    MAX_K,
    CodecPlan,
    check_coded_args,
    check_k,
    codec_bits,
    codec_plan,
    eg_bits,
    eg_length,
    entropy_bits,
    fl_bits,
    huffman_bits,
    huffman_code_lengths,
    signed_to_unsigned,
    summary,
    unsigned_to_signed,
)
from .differentiable import eg_rate, eg_rate_surrogate
from .model import (
    BETA_GRID,
    eg_order_bits,
    model_step,
    predict_eg_bits,
    predict_entropy_bits,
    prepare,
    step_for_rate,
)

__all__ = [
    "BETA_GRID",
    "MAX_AUTO_K",
    "MAX_K",
    "CodecPlan",
    "check_coded_args",
    "check_k",
    "codec_bits",
    "codec_plan",
    "eg_bits",
    "eg_length",
    "eg_order_bits",
    "eg_rate",
    "eg_rate_surrogate",
    "entropy_bits",
    "fl_bits",
    "huffman_bits",
    "huffman_code_lengths",
    "model_step",
    "predict_eg_bits",
    "predict_entropy_bits",
    "prepare",
    "quantize",
    "rms",
    "signed_to_unsigned",
    "step_for_rate",
    "summary",
    "unsigned_to_signed",
]
