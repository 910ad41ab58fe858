"""Entry script: DiLoCo training of the GPT workload (``--wire gg | int8 | fp32``), or
plain DDP for comparison (``--wire ddp``).

The code is :mod:`ggcomm.tools.train_diloco`; this file lets
``torchrun --nproc_per_node=2 launch/train_diloco.py`` name a path.
``python -m ggcomm.tools.train_diloco`` is the same.
"""

import sys

from ggcomm.tools.train_diloco import main

if __name__ == "__main__":
    sys.exit(main())
