"""numba kernels of the Exp-Golomb wire codec (imported as ``ggcomm.kernels``).

``eg`` holds the fast block-parallel kernels, ``reference`` a slow pure-Python
implementation of the same format that the tests hold them to, bit for bit.
"""
