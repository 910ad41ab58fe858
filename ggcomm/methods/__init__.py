"""Training methods that make tensors cheaper to send (arXiv 2506.00486).

- :mod:`.init`: generalized-Gaussian weight initialization (``gg_``, ``apply_gg_init``).
- :mod:`.act`: activation compression training (``ACT``), a rate penalty on the activations
  a pipeline stage sends.
- :mod:`.gct`: gradient compression training (``GCT``), a rate term on the gradients DDP sends.
- :mod:`.backslash`: ``BackSlash``, the weight-rate baseline with a fitted GG prior.
- :mod:`.deepshape`: DeepShape, the post-training remap of the weights to a sharper GG
  (arXiv 2506.00486, earlier version).

They use the library core (``ggcomm.gg``, ``ggcomm.rate``, ``ggcomm.quant``) and no
transport; the transports do not import them. ``ggcomm.init``, ``ggcomm.act``,
``ggcomm.gct`` and ``ggcomm.backslash`` are the same modules under their former names.
"""

from .act import ACT, RateTap
from .backslash import BackSlash
from .deepshape import DeepShapeReport, deepshape_
from .gct import GCT
from .init import GGInitResult, apply_gg_init, gg_

__all__ = [
    "ACT",
    "BackSlash",
    "DeepShapeReport",
    "GCT",
    "GGInitResult",
    "RateTap",
    "apply_gg_init",
    "deepshape_",
    "gg_",
]
