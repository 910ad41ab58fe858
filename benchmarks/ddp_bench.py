"""DDP gradient-communication methods side by side: ``ggcomm bench`` as a script.

Same options as ``ggcomm bench`` (see :mod:`ggcomm.tools.bench`)::

    python benchmarks/ddp_bench.py                 # full matrix; as root for the shaped links
    python benchmarks/ddp_bench.py --quick         # smoke test, results named *-quick.*
"""

import sys

from ggcomm.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
