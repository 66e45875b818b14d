"""Norm-based generalization measures callback: logs ``measures/<name>`` (Jiang et al. 2020).

A thin wrapper over :mod:`lightning_optsurvey.measures.norms`. It keeps the initial weights (taken at the
start of the first fit) in its checkpoint state, so the distance from initialization survives a resume.
Each measure is one row of :data:`MEASURES`, ``name -> fn(callback, module, batches) -> float``; adding a
measure is adding a row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from lightning_optsurvey.callbacks._measure import MeasuringCallback, check_loss_fn, resolve_loss_fn, unwrap_module
from lightning_optsurvey.measures import (
    distance_from_init,
    fisher_rao_norm,
    frobenius_norm_product,
    make_generator,
    parameter_norm,
    path_norm,
    spectral_norm_product,
)
from lightning_optsurvey.validation import check_names

__all__ = ["MEASURES", "GeneralizationMeasures"]

Measure = Callable[["GeneralizationMeasures", LightningModule, list[Any]], float]


def _distance_from_init(cb: GeneralizationMeasures, module: LightningModule, batches: list[Any]) -> float:
    if cb._initial is None:
        raise RuntimeError("no initial weights recorded: the callback missed on_fit_start")
    return distance_from_init(module, cb._initial)


MEASURES: dict[str, Measure] = {
    "param_norm": lambda cb, module, batches: parameter_norm(module),
    "distance_from_init": _distance_from_init,
    "spectral_product": lambda cb, module, batches: spectral_norm_product(
        module, cb.example_input(module, batches), tol=1e-4, generator=make_generator(module.device, cb.seed)),
    "frobenius_product": lambda cb, module, batches: frobenius_norm_product(module),
    "path_norm": lambda cb, module, batches: path_norm(module, cb.example_input(module, batches)),
    "fisher_rao": lambda cb, module, batches: fisher_rao_norm(module, resolve_loss_fn(module, cb.loss_fn), batches),
}


class GeneralizationMeasures(MeasuringCallback):
    """Log norm-based measures of the weights, each as ``measures/<name>``.

    - ``param_norm``: :func:`~lightning_optsurvey.measures.parameter_norm`;
    - ``distance_from_init``: :func:`~lightning_optsurvey.measures.distance_from_init` from the weights
      at the start of the first fit;
    - ``spectral_product``: :func:`~lightning_optsurvey.measures.spectral_norm_product` (convolutions as
      the linear maps they compute, at the input size of the measurement batches);
    - ``frobenius_product``: :func:`~lightning_optsurvey.measures.frobenius_norm_product`;
    - ``path_norm``: :func:`~lightning_optsurvey.measures.path_norm`;
    - ``fisher_rao``: :func:`~lightning_optsurvey.measures.fisher_rao_norm` on the fixed subset.

    The module is measured in eval mode. Its weight layers are those of the LightningModule itself.
    ``path_norm`` and ``spectral_product`` run the model on an input: the inputs of ``(inputs, targets)``
    batches, or, for a module with ``compute_loss`` (any batch structure), its ``example_input_array``
    when set. ``fisher_rao`` uses the measured loss (``compute_loss`` when defined).

    Args:
        measures: A non-empty subset of :data:`MEASURES`.
        loss_fn: ``loss_fn(outputs, targets)`` or a ``BatchLoss``; default: the module's ``compute_loss(batch)``
            if it defines one (any batch structure), else its ``loss_fn`` or cross-entropy (``resolve_loss_fn``).
        every_n_epochs: Measure after every n-th epoch (``None``: never at epoch ends).
        every_n_steps: Measure after every n-th optimizer step (``None``: never).
        num_batches: Batches in the fixed subset.
        seed: Seed of the subset and of the spectral norms' start vectors.
        at_fit_end: Also measure once when training ends.

    Raises:
        TypeError: For an argument of the wrong type.
        ValueError: For an unknown or repeated measure, or a bad cadence.

    References:
        Jiang, Neyshabur, Mobahi, Krishnan, Bengio. Fantastic Generalization Measures and Where to Find
        Them. ICLR 2020. https://arxiv.org/abs/1912.02178
    """

    def __init__(
        self,
        measures: Sequence[str] = tuple(MEASURES),
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        num_batches: int = 2,
        seed: int = 0,
        *,
        at_fit_end: bool = False,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, every_n_steps=every_n_steps, num_batches=num_batches,
                         seed=seed, at_fit_end=at_fit_end)
        self.measures = check_names("measures", measures, MEASURES)
        self.loss_fn = check_loss_fn(loss_fn)
        self._initial: dict[str, Tensor] | None = None

    @override
    def state_key_config(self) -> dict[str, Any]:
        return {**super().state_key_config(), "measures": self.measures}

    @override
    def uses_loss(self) -> bool:
        return "fisher_rao" in self.measures  # the others are norms of the weights

    @override
    def check_batch(self, pl_module: LightningModule, batch: Any) -> None:
        if {"path_norm", "spectral_product"} & set(self.measures):
            self.example_input(pl_module, [batch])  # raises, naming what to add, if no input can be found

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Callback states are restored before on_fit_start, so a resumed run keeps its initial weights.
        if self._initial is None and "distance_from_init" in self.measures:
            # Every parameter, frozen ones too: a block unfrozen later (fine-tuning) is then measured as well.
            module = unwrap_module(pl_module)
            self._initial = {n: p.detach().cpu().clone() for n, p in module.named_parameters()}

    @override
    def measure(self, trainer: Trainer, pl_module: LightningModule, batches: list[Any]) -> dict[str, float]:
        pl_module.eval()
        return {f"measures/{name}": MEASURES[name](self, pl_module, batches) for name in self.measures}

    @staticmethod
    def example_input(pl_module: LightningModule, batches: list[Any]) -> Any:
        """The model's input for the shape-finding passes.

        The inputs of an ``(inputs, targets)`` batch, else the module's ``example_input_array`` (Lightning's
        own attribute).
        """
        batch = batches[0]
        own_loss = callable(getattr(pl_module, "compute_loss", None))
        if isinstance(batch, tuple | list) and len(batch) == 2 and not own_loss:
            return batch[0]
        example = getattr(pl_module, "example_input_array", None)
        if example is not None:
            return move_data_to_device(example, pl_module.device)
        if isinstance(batch, tuple | list) and len(batch) == 2:
            return batch[0]
        raise RuntimeError(
            f"GeneralizationMeasures: path_norm and spectral_product run the model on an input, but the batches "
            f"of {type(pl_module).__name__} are {type(batch).__name__}s, not (inputs, targets) pairs; set "
            "self.example_input_array (an input forward takes) in its __init__, or leave these two measures out")

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["initial"] = None if self._initial is None else {k: v.clone() for k, v in self._initial.items()}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        initial = state_dict.get("initial")
        self._initial = None if initial is None else {k: torch.as_tensor(v).clone() for k, v in initial.items()}
