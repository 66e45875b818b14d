r"""The measuring callbacks ``optsurvey compare`` attaches to every run, sized to cost little.

Measured on the digits CNN (``benchmarks/measure_overhead.py``, README "Measurement cost"), the set adds
at most half of training's time to a run while logging what the comparison table shows:

- ``GeneralizationGap``: every ``GAP_EVERY_N_EPOCHS`` epochs and when training ends, each side on a fixed
  subset sized for a standard error of at most ``GAP_STDERR`` on its accuracy (the bound
  :math:`\sqrt{p(1-p)/n} \le 1/(2\sqrt n)`: 400 samples), not the whole training and validation sets;
- ``Sharpness(kinds=("sam",))``: every ``GAP_EVERY_N_EPOCHS`` epochs and when training ends, SAM's one-step
  sharpness at rho=0.05 on one batch;
- ``HessianSpectrum``: top-2 eigenvalues (Lanczos to a relative residual of 1e-3) and the trace (to a
  relative standard error of ``TRACE_RTOL``, deflated by every Ritz pair of that Lanczos basis) once, when
  training ends, and every ``HESSIAN_EVERY_N_EPOCHS`` epochs of a longer run (warm-started from the previous
  eigenvectors);
- with several processes, the consensus distance between the ranks' models every 10 steps, except under
  the asynchronous strategies: they log their own distance to the center under the same key, and a
  collective every 10 steps would put back the barrier they remove.
"""

from __future__ import annotations

from typing import Any

from lightning_optsurvey.callbacks.consensus import ConsensusDistance
from lightning_optsurvey.callbacks.generalization import GeneralizationGap
from lightning_optsurvey.callbacks.hessian import HessianSpectrum, TraceConfig
from lightning_optsurvey.callbacks.sharpness import Sharpness

__all__ = ["GAP_EVERY_N_EPOCHS", "GAP_STDERR", "HESSIAN_EVERY_N_EPOCHS", "TRACE_RTOL", "default_callbacks"]

GAP_STDERR = 0.025
GAP_EVERY_N_EPOCHS = 2
TRACE_RTOL = 0.1
HESSIAN_EVERY_N_EPOCHS = 10


def default_callbacks(world_size: int = 1, strategy: str | None = None) -> list[Any]:
    """The measuring callbacks of ``optsurvey compare`` (see the module docstring).

    Args:
        world_size: Number of processes of the run.
        strategy: The registered name of the run's strategy (``None``: Lightning's default).
    """
    from lightning_optsurvey._compat import registered_strategy
    from lightning_optsurvey.strategies.easgd_async import AsyncCenterStrategy

    made: list[Any] = [
        HessianSpectrum(top_k=2, trace=TraceConfig(rtol=TRACE_RTOL), every_n_epochs=HESSIAN_EVERY_N_EPOCHS,
                        at_fit_end=True),
        GeneralizationGap(every_n_epochs=GAP_EVERY_N_EPOCHS, stderr=GAP_STDERR, at_fit_end=True),
        Sharpness(kinds=("sam",), rho=0.05, num_batches=1, every_n_epochs=GAP_EVERY_N_EPOCHS, at_fit_end=True),
    ]
    kind = registered_strategy(strategy)[0] if strategy else None
    asynchronous = isinstance(kind, type) and issubclass(kind, AsyncCenterStrategy)
    if world_size > 1 and not asynchronous:
        made.append(ConsensusDistance(every_n_steps=10))
    return made
