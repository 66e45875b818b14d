"""Loss landscape callback: a 1-D or 2-D slice of the training loss, as a PNG and a JSON grid.

A thin wrapper over :mod:`lightning_optsurvey.measures.landscape`. Files go to the run's MLflow artifacts
(``landscape/<name>.png`` and ``.json``) when the logger is an ``MLFlowLogger``, else under
``trainer.log_dir/landscape``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from lightning_optsurvey.callbacks._artifacts import save_figure, save_json
from lightning_optsurvey.callbacks._measure import MeasuringCallback, check_loss_fn, resolve_loss_fn, unwrap_module
from lightning_optsurvey.measures import make_generator
from lightning_optsurvey.measures.landscape import loss_surface, normalize_to_filters
from lightning_optsurvey.validation import check_choice, check_float, check_int

__all__ = ["LossLandscape"]

_KINDS = ("1d", "2d")
_DIRECTIONS = ("filter_normalized", "init_to_final")
_AT = ("fit_end", "epoch_end")


class LossLandscape(MeasuringCallback):
    r"""Plot the loss on a line or plane through the current weights.

    The grid is :math:`L(w + \alpha d_1)` (1-D) or :math:`L(w + \alpha d_1 + \beta d_2)` (2-D) with
    :math:`\alpha, \beta \in [-\text{span}, \text{span}]` on ``resolution`` points each, on the fixed
    training subset, in eval mode.

    - ``directions="filter_normalized"``: Gaussian directions rescaled filter by filter to the weights'
      filter norms, biases and normalization parameters left out (Li et al. 2018).
    - ``directions="init_to_final"``: :math:`d_1 = w - w_0` from the weights at the start of the first
      fit, so :math:`\alpha = -1` is the initialization (Goodfellow et al. 2015); in 2-D, :math:`d_2` is a
      filter-normalized direction made orthogonal to :math:`d_1` and scaled to its norm.

    The directions are drawn from ``seed`` on first use and kept in the checkpoint state, so every slice
    of a run (and of its resumption) uses the same ones. Also logs ``landscape/center_loss``.

    Args:
        kind: ``"1d"`` or ``"2d"``.
        directions: ``"filter_normalized"`` or ``"init_to_final"``.
        resolution: Points per axis, >= 3.
        span: Half-width of the grid in units of the directions, > 0.
        at: ``"fit_end"`` (once) or ``"epoch_end"`` (every ``every_n_epochs``-th epoch).
        every_n_epochs: Cadence when ``at="epoch_end"`` (ignored, and may be ``None``, with ``at="fit_end"``).
        num_batches: Batches in the fixed subset.
        loss_fn: ``loss_fn(outputs, targets)`` or a ``BatchLoss``; default: the module's ``compute_loss(batch)``
            if it defines one (any batch structure), else its ``loss_fn`` or cross-entropy (``resolve_loss_fn``).
        seed: Seed of the subset and of the directions.

    Raises:
        ValueError: For an unknown ``kind``, ``directions`` or ``at``, or an out-of-range number.

    References:
        Li, Xu, Taylor, Studer, Goldstein. Visualizing the Loss Landscape of Neural Nets. NeurIPS 2018.
        https://arxiv.org/abs/1712.09913
        Goodfellow, Vinyals, Saxe. Qualitatively characterizing neural network optimization problems.
        ICLR 2015. https://arxiv.org/abs/1412.6544
    """

    def __init__(
        self,
        kind: str = "1d",
        directions: str = "filter_normalized",
        resolution: int = 25,
        span: float = 1.0,
        at: str = "fit_end",
        every_n_epochs: int | None = 1,
        num_batches: int = 4,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        seed: int = 0,
    ) -> None:
        at = check_choice("at", at, _AT)
        if every_n_epochs is None and at == "fit_end":
            every_n_epochs = 1  # the cadence of at="epoch_end"; unused when the landscape is drawn once
        elif every_n_epochs is None:
            raise ValueError("every_n_epochs must be a positive integer with at='epoch_end', got None")
        super().__init__(every_n_epochs=every_n_epochs, num_batches=num_batches, seed=seed)
        self.kind = check_choice("kind", kind, _KINDS)
        self.directions = check_choice("directions", directions, _DIRECTIONS)
        self.at = at
        self.resolution = check_int("resolution", resolution, low=3)
        self.span = check_float("span", span, low=0.0, low_open=True)
        self.loss_fn = check_loss_fn(loss_fn)
        self._initial: dict[str, Tensor] | None = None
        self._random: list[dict[str, Tensor]] | None = None
        self.last_grid: dict[str, Any] | None = None

    @override
    def state_key_config(self) -> dict[str, Any]:
        return {**super().state_key_config(), "kind": self.kind, "directions": self.directions,
                "resolution": self.resolution, "span": self.span, "at": self.at}

    # -- hooks ---------------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._initial is None and self.directions == "init_to_final":
            # Every parameter, frozen ones too: a block unfrozen later (fine-tuning) then has its start.
            module = unwrap_module(pl_module)
            self._initial = {n: p.detach().cpu().clone() for n, p in module.named_parameters()}

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at == "epoch_end":
            super().on_train_epoch_end(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        return  # slices are taken at epoch ends or at the end of fit only

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at == "fit_end":
            self.run_measurement(trainer, pl_module)

    # -- the measurement -----------------------------------------------------------------------------------
    def _directions(self, module: LightningModule) -> list[dict[str, Tensor]]:
        device = next(module.parameters()).device
        if self._random is None:
            generator = make_generator(torch.device("cpu"), self.seed)
            cpu = {n: p.detach().cpu() for n, p in module.named_parameters()}  # frozen too: they may thaw
            self._random = [
                {n: torch.randn(t.shape, generator=generator, dtype=t.dtype) for n, t in cpu.items()}
                for _ in range(2)
            ]
        randoms = [normalize_to_filters({n: t.to(device) for n, t in r.items()}, module) for r in self._random]
        if self.directions == "filter_normalized":
            return randoms[: 1 if self.kind == "1d" else 2]
        if self._initial is None:
            raise RuntimeError("no initial weights recorded: the callback missed on_fit_start")
        d1 = {n: p.detach() - self._initial[n].to(p.device, p.dtype)
              for n, p in module.named_parameters() if p.requires_grad}
        if self.kind == "1d":
            return [d1]
        flat1 = torch.cat([t.reshape(-1) for t in d1.values()])
        flat2 = torch.cat([randoms[0][n].reshape(-1) for n in d1])
        flat2 = flat2 - (flat2 @ flat1) / (flat1 @ flat1).clamp_min(1e-30) * flat1
        flat2 = flat2 * (flat1.norm() / flat2.norm().clamp_min(1e-30))
        d2 = dict(zip(d1, flat2.split([t.numel() for t in d1.values()])))
        return [d1, {n: t.view_as(d1[n]) for n, t in d2.items()}]

    @override
    def measure(self, trainer: Trainer, pl_module: LightningModule, batches: list[Any]) -> dict[str, float]:
        pl_module.eval()
        loss_fn = resolve_loss_fn(pl_module, self.loss_fn)
        directions = self._directions(pl_module)
        dtype = next(pl_module.parameters()).dtype
        axis = torch.linspace(-self.span, self.span, self.resolution, dtype=dtype)
        grid = loss_surface(pl_module, loss_fn, batches, directions, axis, axis if self.kind == "2d" else None)
        center = float(loss_surface(pl_module, loss_fn, batches, directions[:1], torch.zeros(1))[0])
        name = f"{self.kind}_{self.directions}_epoch_{trainer.current_epoch}"
        self.last_grid = {"kind": self.kind, "directions": self.directions, "epoch": trainer.current_epoch,
                          "step": trainer.global_step, "alphas": axis.tolist(),
                          "betas": axis.tolist() if self.kind == "2d" else None,
                          "loss": grid.double().cpu().tolist(), "center_loss": center}
        save_json(trainer, self.last_grid, "landscape", f"{name}.json")
        save_figure(trainer, self._plot(axis, grid), "landscape", f"{name}.png")
        return {"landscape/center_loss": center}

    def _plot(self, axis: Tensor, grid: Tensor) -> Any:
        from matplotlib.figure import Figure  # not pyplot: no global backend or figure registry touched

        fig = Figure(figsize=(5, 4))
        ax = fig.subplots()
        a = axis.double().cpu().numpy()
        z = grid.double().cpu().numpy()
        xlabel = "alpha (w - w0)" if self.directions == "init_to_final" else "alpha"
        if self.kind == "1d":
            ax.plot(a, z)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("loss")
        else:
            contour = ax.contour(a, a, z.T, levels=20)
            ax.clabel(contour, fontsize=6)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("beta")
        ax.set_title(f"loss landscape ({self.kind}, {self.directions})")
        return fig

    # -- state ---------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["initial"] = self._initial
        state["random"] = self._random
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._initial = state_dict.get("initial")
        self._random = state_dict.get("random")
