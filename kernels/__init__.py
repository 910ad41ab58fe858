"""numba kernels of the Exp-Golomb wire codec and of RF8 (imported as ``ggcomm.kernels``).

``eg`` and ``rf8`` hold the fast block-parallel kernels, ``reference`` a slow pure-Python
implementation of the same formats that the tests hold them to, bit for bit.
"""
