"""Entry script: DDP training of the built-in workloads with a choice of gradient-communication
hook.

The code is :mod:`ggcomm.tools.train_ddp` (so that ``ggcomm bench`` also runs from an installed
wheel); this file lets ``torchrun --nproc_per_node=2 launch/train_ddp.py`` name a path.
``python -m ggcomm.tools.train_ddp`` is the same.
"""

import sys

from ggcomm.tools.train_ddp import main

if __name__ == "__main__":
    sys.exit(main())
