"""The compressors of CHOCO-SGD, importable from the strategies package.

They live in the Lightning-free :mod:`lightning_optsurvey.averaging.compression`, which the theory checks use.
"""

from lightning_optsurvey.averaging.compression import (  # noqa: F401
    COMPRESSORS,
    QSGD,
    Compressor,
    RandomK,
    Sign,
    TopK,
    make_compressor,
)
