"""A fast configuration of every measuring callback in ``callbacks.__all__``: the one list tests iterate.

A callback added to ``callbacks.__all__`` without an entry in ``FAST_CONFIGS`` fails
``tests/test_callbacks_conformance.py::test_every_measuring_callback_has_a_fast_config``, and every
suite that runs "each callback" (the model zoo, pickling, the argument rule) picks it up from here.
"""

from __future__ import annotations

from collections.abc import Callable

from lightning_optsurvey import callbacks as cbs
from lightning_optsurvey.callbacks import MeasuringCallback

FAST_CONFIGS: dict[str, Callable[[], MeasuringCallback]] = {
    "HessianSpectrum": lambda: cbs.HessianSpectrum(top_k=1, bottom_k=1, trace=cbs.TraceConfig(matvecs=6), tol=1e-2,
                                                   max_iter=12),
    "Sharpness": lambda: cbs.Sharpness(kinds=("sam", "adaptive_worst_case", "average", "keskar",
                                              "pac_bayes_sigma"), steps=2, num_samples=2, num_batches=1),
    "GeneralizationGap": lambda: cbs.GeneralizationGap(num_train_batches=2),
    "GradientNoiseScale": lambda: cbs.GradientNoiseScale(num_batches=2),
    "EdgeOfStability": lambda: cbs.EdgeOfStability(num_batches=1, tol=1e-2),
    "LossLandscape": lambda: cbs.LossLandscape(kind="1d", directions="init_to_final", resolution=3,
                                               num_batches=1, at="epoch_end"),
    "GeneralizationMeasures": lambda: cbs.GeneralizationMeasures(num_batches=1),
    "ConsensusDistance": lambda: cbs.ConsensusDistance(every_n_steps=None, every_n_epochs=1),
}


def measuring_callback_names() -> list[str]:
    """The measuring callback classes exported by ``callbacks.__all__`` (the base class excluded), sorted."""
    return sorted(
        name for name in cbs.__all__
        if isinstance(obj := getattr(cbs, name), type) and issubclass(obj, MeasuringCallback)
        and obj is not MeasuringCallback
    )
