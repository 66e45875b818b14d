"""Sharpness callback: logs ``sharpness/<kind>`` of the fixed measurement subset during training.

A thin wrapper over :mod:`lightning_optsurvey.measures.sharpness`; the measurement runs inside the
side-effect-free context of :mod:`lightning_optsurvey.callbacks._measure`, with the module in eval mode.

Each kind is one row of :data:`KINDS`: the function, the callback options it takes and its fixed
arguments. Adding a measure is adding a row::

    KINDS["my_kind"] = SharpnessKind(my_sharpness, options=("rho",), fixed={"p": 3})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from lightning_optsurvey.callbacks._measure import MeasuringCallback, check_loss_fn, resolve_loss_fn
from lightning_optsurvey.measures import (
    average_sharpness,
    keskar_sharpness,
    make_generator,
    pac_bayes_sigma,
    sam_sharpness,
    worst_case_sharpness,
)
from lightning_optsurvey.validation import check_float, check_int, check_names, check_optional

__all__ = ["KINDS", "Sharpness", "SharpnessKind"]


@dataclass(frozen=True)
class SharpnessKind:
    """One sharpness measure of :class:`Sharpness`.

    Attributes:
        fn: ``fn(model, loss_fn, batches, **kwargs) -> float``.
        options: Names of the :class:`Sharpness` options passed to ``fn`` under the same names.
        fixed: Further keyword arguments, always the same for this kind.
        random: Whether ``fn`` takes a ``generator`` (seeded with the callback's seed at every measurement).
    """

    fn: Callable[..., float]
    options: tuple[str, ...]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    random: bool = True

    def __call__(self, callback: Sharpness, model: Any, loss_fn: Any, batches: list[Any]) -> float:
        kwargs = {name: getattr(callback, name) for name in self.options}
        if self.random:
            kwargs["generator"] = make_generator(next(model.parameters()).device, callback.seed)
        return self.fn(model, loss_fn, batches, **kwargs, **self.fixed)


KINDS: dict[str, SharpnessKind] = {
    "sam": SharpnessKind(sam_sharpness, ("rho", "m"), random=False),
    "worst_case": SharpnessKind(worst_case_sharpness, ("rho", "steps"), {"norm": "l2", "adaptive": False}),
    "adaptive_worst_case": SharpnessKind(worst_case_sharpness, ("rho", "steps"), {"norm": "l2", "adaptive": True}),
    "linf_worst_case": SharpnessKind(worst_case_sharpness, ("rho", "steps"), {"norm": "linf", "adaptive": False}),
    "average": SharpnessKind(average_sharpness, ("sigma", "num_samples"), {"adaptive": False}),
    "adaptive_average": SharpnessKind(average_sharpness, ("sigma", "num_samples"), {"adaptive": True}),
    "keskar": SharpnessKind(keskar_sharpness, ("epsilon", "steps")),
    "pac_bayes_sigma": SharpnessKind(pac_bayes_sigma, ("max_deviation", "num_samples")),
}


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

        at_fit_end: Also measure once when training ends.

    Raises:
        TypeError: For an argument of the wrong type.
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
        *,
        at_fit_end: bool = False,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, every_n_steps=every_n_steps, num_batches=num_batches,
                         seed=seed, at_fit_end=at_fit_end)
        self.kinds = check_names("kinds", kinds, KINDS)
        self.rho = check_float("rho", rho, low=0.0, low_open=True)
        self.sigma = check_float("sigma", sigma, low=0.0, low_open=True)
        self.steps = check_int("steps", steps)
        self.num_samples = check_int("num_samples", num_samples)
        self.m = check_optional(check_int, "m", m)
        self.epsilon = check_float("epsilon", epsilon, low=0.0, low_open=True)
        self.max_deviation = check_float("max_deviation", max_deviation, low=0.0, low_open=True)
        self.loss_fn = check_loss_fn(loss_fn)

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
        return {f"sharpness/{kind}": KINDS[kind](self, pl_module, loss_fn, batches) for kind in self.kinds}
