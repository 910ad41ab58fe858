"""Entry script: FSDP2 training of the GPT workload with ggcomm's EG-coded reduce-scatter
(``--reduce gg``) or FSDP's own (``--reduce fp32`` / ``bf16``).

The code is :mod:`ggcomm.tools.train_fsdp`; this file lets
``torchrun --nproc_per_node=2 launch/train_fsdp.py`` name a path.
``python -m ggcomm.tools.train_fsdp`` is the same.
"""

import sys

from ggcomm.tools.train_fsdp import main

if __name__ == "__main__":
    sys.exit(main())
