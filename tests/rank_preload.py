"""What every spawned test rank needs before its first step, imported once per test session
by the fork server that ``dist_utils.run`` starts its ranks from.

A fresh interpreter spends seconds on these on each spawn: importing torch, the
``torch._dynamo`` that ``DistributedDataParallel.__init__`` imports, FSDP and pipelining,
building ggcomm's rate-model table (``ggcomm.rate.model.prepare``) and loading the codec's
numba kernels from their cache (numba's first call sets up its compiler, the longest part).
Only imports and computation on the calling thread happen here: no process group, no codec
thread pool (forking a process with live threads of its own would not be safe).
"""

import torch  # noqa: F401
import torch._dynamo  # noqa: F401
import torch.distributed  # noqa: F401
import torch.distributed.fsdp  # noqa: F401
import torch.distributed.pipelining  # noqa: F401
import torch.nn.parallel  # noqa: F401

import ggcomm.codec  # noqa: F401
import ggcomm.ddp  # noqa: F401
import ggcomm.diloco  # noqa: F401
import ggcomm.exchange  # noqa: F401
import ggcomm.fsdp  # noqa: F401
import ggcomm.pipeline  # noqa: F401
import ggcomm.powersgd  # noqa: F401
from ggcomm import codec
from ggcomm.rate import model

model.prepare()
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    codec.decode(codec.encode(torch.linspace(-3, 3, 300, dtype=dtype), 0.1))
