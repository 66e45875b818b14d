"""Measuring callbacks: what is measured during training, logged through Lightning's loggers.

Every measuring callback builds on :mod:`lightning_optsurvey.callbacks._measure`, which guarantees that
training with the callback is bitwise identical to training without it.
"""

from lightning_optsurvey.callbacks._measure import Cadence, MeasuringCallback, measuring
from lightning_optsurvey.callbacks.consensus import ConsensusDistance
from lightning_optsurvey.callbacks.hessian import HessianSpectrum

__all__ = ["Cadence", "ConsensusDistance", "HessianSpectrum", "MeasuringCallback", "measuring"]
