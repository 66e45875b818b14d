"""Sharpness callback: logs ``sharpness/<kind>`` of the fixed measurement subset during training.

A thin wrapper over :mod:`lightning_optsurvey.measures.sharpness`; the measurement runs inside the
side-effect-free context of :mod:`lightning_optsurvey.callbacks._measure`, with the module in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from lightning_optsurvey.callbacks._measure import MeasuringCallback, resolve_loss_fn
from lightning_optsurvey.measures._functional import check_count, check_positive, make_generator
from lightning_optsurvey.measures.sharpness import (
    average_sharpness,
    keskar_sharpness,
    pac_bayes_sigma,
    sam_sharpness,
    worst_case_sharpness,
)

__all__ = ["Sharpness"]

KINDS = (
    "sam",
    "worst_case",
    "adaptive_worst_case",
    "linf_worst_case",
    "average",
    "adaptive_average",
    "keskar",
    "pac_bayes_sigma",
)


class Sharpness(MeasuringCallback):
    r"""Log sharpness measures of the current weights on a fixed subset of the training data.

    Kinds (each logged as ``sharpness/<kind>``):

    - ``"sam"``: :func:`~lightning_optsurvey.measures.sam_sharpness` with radius ``rho`` (and ``m``);
    - ``"worst_case"``, ``"adaptive_worst_case"``, ``"linf_worst_case"``:
      :func:`~lightning_optsurvey.measures.worst_case_sharpness`, l2 plain, l2 adaptive (ASAM's
      :math:`|w|`-scaled ball), l-infinity plain, with radius ``rho`` and ``steps`` ascent steps;
    - ``"average"``, ``"adaptive_average"``: :func:`~lightning_optsurvey.measures.average_sharpness`
      with noise level ``sigma`` and ``num_samples`` draws;
    - ``"keskar"``: :func:`~lightning_optsurvey.measures.keskar_sharpness` with box size ``epsilon``;
    - ``"pac_bayes_sigma"``: :func:`~lightning_optsurvey.measures.pac_bayes_sigma` with
      ``max_deviation`` (a standard deviation; larger means flatter).

    The module is measured in eval mode (Dropout off, BatchNorm on running statistics), so values are
    deterministic. Random kinds draw from a generator seeded with ``seed`` at every measurement (common
    random numbers: epoch-to-epoch changes are not sampling noise). Under data parallelism each rank
    measures its own shard and rank 0's value is logged.

    Args:
        kinds: Which measures, a non-empty subset of :data:`KINDS`.
        rho: Radius of the SAM step and of the worst-case balls.
        sigma: Standard deviation of the average-case noise.
        steps: Ascent steps of the worst-case and Keskar measures.
        num_samples: Monte-Carlo draws of the average-case and PAC-Bayes measures.
        m: Group size of SAM's m-sharpness (``None``: one step on the whole subset).
        epsilon: Box size of Keskar's measure.
        max_deviation: Loss deviation bound of the PAC-Bayes sigma.
        loss_fn: ``loss_fn(outputs, targets)`` or a ``BatchLoss``; default: the module's ``compute_loss(batch)``
            if it defines one (any batch structure), else its ``loss_fn`` or cross-entropy (``resolve_loss_fn``).
        every_n_epochs: Measure after every n-th epoch (``None``: never at epoch ends).
        every_n_steps: Measure after every n-th optimizer step (``None``: never).
        num_batches: Batches of the train loader's size in the fixed subset.
        seed: Seed of the subset and of the random kinds.

    Raises:
        ValueError: For an unknown or repeated kind, or an out-of-range number.

    Example:
        >>> cb = Sharpness(kinds=("sam", "average"), rho=0.05, sigma=0.01)
        >>> cb.state_key.startswith("Sharpness")
        True

    References:
        Foret et al. 2021 (https://arxiv.org/abs/2010.01412), Kwon et al. 2021
        (https://arxiv.org/abs/2102.11600), Andriushchenko et al. 2023 (https://arxiv.org/abs/2302.07011),
        Keskar et al. 2017 (https://arxiv.org/abs/1609.04836), Jiang et al. 2020
        (https://arxiv.org/abs/1912.02178).
    """

    def __init__(
        self,
        kinds: Sequence[str] = ("sam", "adaptive_worst_case", "average"),
        rho: float = 0.05,
        sigma: float = 0.01,
        steps: int = 20,
        num_samples: int = 16,
        m: int | None = None,
        epsilon: float = 1e-3,
        max_deviation: float = 0.1,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        num_batches: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, every_n_steps=every_n_steps, num_batches=num_batches,
                         seed=seed)
        if isinstance(kinds, str):
            raise ValueError(f"kinds must be a sequence of kind names, got the string {kinds!r}; "
                             f"wrap it: kinds=({kinds!r},)")
        kinds = tuple(kinds)
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds or len(set(kinds)) != len(kinds):
            raise ValueError(f"kinds must be distinct names among {KINDS}, got {kinds!r}")
        self.kinds = kinds
        self.rho = check_positive("rho", rho)
        self.sigma = check_positive("sigma", sigma)
        self.steps = check_count("steps", steps)
        self.num_samples = check_count("num_samples", num_samples)
        self.m = None if m is None else check_count("m", m)
        self.epsilon = check_positive("epsilon", epsilon)
        self.max_deviation = check_positive("max_deviation", max_deviation)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable as loss_fn(outputs, targets), got {loss_fn!r}")
        self.loss_fn = loss_fn

    @override
    def state_key_config(self) -> dict[str, Any]:
        return {
            **super().state_key_config(),
            "kinds": self.kinds,
            "rho": self.rho,
            "sigma": self.sigma,
            "steps": self.steps,
            "num_samples": self.num_samples,
            "m": self.m,
            "epsilon": self.epsilon,
            "max_deviation": self.max_deviation,
        }

    @override
    def measure(self, trainer: Trainer, pl_module: LightningModule, batches: list[Any]) -> dict[str, float]:
        pl_module.eval()
        loss_fn = resolve_loss_fn(pl_module, self.loss_fn)
        device = next(pl_module.parameters()).device
        args = (pl_module, loss_fn, batches)
        out: dict[str, float] = {}
        for kind in self.kinds:
            generator = make_generator(device, self.seed)
            if kind == "sam":
                value = sam_sharpness(*args, rho=self.rho, m=self.m)
            elif kind.endswith("worst_case"):
                value = worst_case_sharpness(*args, rho=self.rho, norm="linf" if kind.startswith("linf") else "l2",
                                             adaptive=kind.startswith("adaptive"), steps=self.steps,
                                             generator=generator)
            elif kind.endswith("average"):
                value = average_sharpness(*args, sigma=self.sigma, adaptive=kind.startswith("adaptive"),
                                          num_samples=self.num_samples, generator=generator)
            elif kind == "keskar":
                value = keskar_sharpness(*args, epsilon=self.epsilon, steps=self.steps, generator=generator)
            else:
                value = pac_bayes_sigma(*args, max_deviation=self.max_deviation, num_samples=self.num_samples,
                                        generator=generator)
            out[f"sharpness/{kind}"] = value
        return out
