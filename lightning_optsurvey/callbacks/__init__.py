"""Measuring callbacks: what is measured during training, logged through Lightning's loggers.

Every measuring callback builds on :mod:`lightning_optsurvey.callbacks._measure`, which guarantees that
training with the callback is bitwise identical to training without it.
"""

from lightning_optsurvey.callbacks._measure import Cadence, MeasuringCallback, measuring
from lightning_optsurvey.callbacks.consensus import ConsensusDistance
from lightning_optsurvey.callbacks.defaults import default_callbacks
from lightning_optsurvey.callbacks.divergence import DivergenceMonitor
from lightning_optsurvey.callbacks.generalization import GeneralizationGap
from lightning_optsurvey.callbacks.generalization_measures import GeneralizationMeasures
from lightning_optsurvey.callbacks.hessian import DensityConfig, HessianSpectrum, TraceConfig
from lightning_optsurvey.callbacks.landscape import LossLandscape
from lightning_optsurvey.callbacks.noise import GradientNoiseScale
from lightning_optsurvey.callbacks.optimizer_loop import OptimizerLoopAdapter, SVRGSnapshot
from lightning_optsurvey.callbacks.resume import ResumeRNG
from lightning_optsurvey.callbacks.sharpness import Sharpness
from lightning_optsurvey.callbacks.stability import EdgeOfStability
from lightning_optsurvey.callbacks.straggler import Straggler
from lightning_optsurvey.callbacks.swa import SWA

__all__ = [
    "SWA",
    "Cadence",
    "ConsensusDistance",
    "DensityConfig",
    "DivergenceMonitor",
    "EdgeOfStability",
    "GeneralizationGap",
    "GeneralizationMeasures",
    "GradientNoiseScale",
    "HessianSpectrum",
    "LossLandscape",
    "MeasuringCallback",
    "OptimizerLoopAdapter",
    "ResumeRNG",
    "SVRGSnapshot",
    "Sharpness",
    "Straggler",
    "TraceConfig",
    "default_callbacks",
    "measuring",
]
