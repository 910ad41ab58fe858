"""Entry script: shaped test hosts (network namespaces joined by a bridge, links shaped with tc
tbf).

The code is :mod:`ggcomm.tools.testhosts` (so that ``ggcomm bench`` also runs from an installed
wheel); this file lets ``python launch/testhosts.py`` name a path. ``python -m
ggcomm.tools.testhosts`` is the same.
"""

import sys

from ggcomm.tools.testhosts import main

if __name__ == "__main__":
    sys.exit(main())
