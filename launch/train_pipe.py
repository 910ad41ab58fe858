"""Entry script: the GPT workload as a DeepSpeed pipeline, with or without ggcomm on the stage
links.

The code is :mod:`ggcomm.tools.train_pipe` (so that ``ggcomm bench`` also runs from an
installed wheel); this file lets ``torchrun --nproc_per_node=2 launch/train_pipe.py`` name a
path. ``python -m ggcomm.tools.train_pipe`` is the same.
"""

import sys

from ggcomm.tools.train_pipe import entry

if __name__ == "__main__":
    sys.exit(entry())
