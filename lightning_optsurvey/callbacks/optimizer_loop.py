"""What the registry's optimizers need from Lightning's training loop, for any ``LightningModule``.

:class:`OptimizerLoopAdapter` serves every optimizer of the Trainer whose
:func:`~lightning_optsurvey.optim.loop.loop_needs` are not empty (``create_optimizer`` or a registry
class built by hand); for all others it does nothing:

- repeated closure evaluations (L-BFGS, SAM, ASAM, GSAM, Entropy-SGD, LPF-SGD, SVRG): after the first
  evaluation of a step (Lightning's ``on_before_optimizer_step`` follows every evaluation), BatchNorm's
  running statistics stop being written and ``self.log`` / ``self.log_dict`` of the module are muted until
  the optimizer's ``step`` returns (a torch step post-hook), so the statistics are updated once per step
  and the logged ``train/loss`` is the loss at the current weights; gradient accumulation and
  ``precision="16-mixed"`` are refused at fit start (the later evaluations would see only the last
  micro-batch; the GradScaler steps without the closure);
- ``create_graph`` (AdaHessian, Sophia-H): the module's ``backward`` is called with ``create_graph=True``
  for the duration of the fit, and a first gradient without a graph (a ``backward`` override that drops
  the keyword) is an error naming the optimizer;
- SVRG's per-epoch snapshot: an :class:`SVRGSnapshot` is run unless one is attached already;
- K-FAC's Monte-Carlo Fisher (``fisher="mc"``): the output of the network given to ``create_optimizer``
  (``model=``) in the step's first evaluation is handed to ``KFAC.sample_fisher`` before the backward.

How it gets onto the Trainer: an installed lightning-optsurvey declares it in Lightning's
``lightning.pytorch.callbacks_factory`` entry point, so *every* Trainer has one and a plain
``configure_optimizers`` returning ``create_optimizer(...)`` needs nothing else. Without the entry point
(the sources on ``PYTHONPATH``, not installed) it is one line, ``Trainer(callbacks=[OptimizerLoopAdapter()])``
or ``configure_callbacks`` returning it (as ``ClassifierModule`` does); a registry optimizer with loop
needs that is stepped by Lightning without it raises an error naming the optimizer and that line.

Why a callback and not something inside the optimizers: the optimizers see only a closure; what has to
change (the module's BatchNorm layers, its ``log``, the ``backward`` call, the train loader for SVRG) is on
Lightning's side, and ``optim`` must not import Lightning. Lightning has no hook that lets a callback
pass keywords to ``backward`` or drop a ``self.log`` call, so those two are instance attributes set on the
module while they apply and removed afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_optsurvey.curvature.kernels import derivative_kernels
from lightning_optsurvey.optim import SVRG, loop
from lightning_optsurvey.optim.loop import frozen_batchnorm_stats
from lightning_optsurvey.validation import check_callable, check_choice, check_int, check_optional

_LIKELIHOODS = ("categorical", "gaussian")


def _mute(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log`` / ``log_dict`` during repeated closure evaluations."""


class _Muted:
    """Context: ``pl_module.log`` and ``log_dict`` do nothing (instance attributes over the methods)."""

    def __init__(self, module: LightningModule) -> None:
        self.module = module
        self.set: list[str] = []

    def __enter__(self) -> None:
        for name in ("log", "log_dict"):
            if name not in self.module.__dict__:
                self.module.__dict__[name] = _mute
                self.set.append(name)

    def __exit__(self, *exc: Any) -> None:
        for name in self.set:
            self.module.__dict__.pop(name, None)
        self.set = []


@dataclass(eq=False)
class _Entry:
    optimizer: Optimizer
    name: str
    needs: tuple[str, ...]
    model: nn.Module | None = None
    handles: list[Any] = field(default_factory=list)


class OptimizerLoopAdapter(Callback):
    """Give every registry optimizer what it needs from Lightning's loop (see the module docstring).

    Args:
        fisher_likelihood: The likelihood K-FAC's Monte-Carlo Fisher samples targets from:
            ``"categorical"`` (outputs are class logits over the last dimension) or ``"gaussian"``
            (outputs are the predictions of a squared loss).

    Raises:
        TypeError: For a ``fisher_likelihood`` that is not a string.
        ValueError: For an unknown ``fisher_likelihood``; at fit start, for gradient accumulation or
            ``precision="16-mixed"`` with an optimizer that evaluates its closure several times.
        RuntimeError: At the first step, when a ``create_graph`` optimizer gets a gradient without a
            graph or K-FAC's Monte-Carlo Fisher gets no outputs to sample from.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[OptimizerLoopAdapter()], logger=False)  # doctest: +SKIP
    """

    def __init__(self, fisher_likelihood: str = "categorical") -> None:
        self.fisher_likelihood = check_choice("fisher_likelihood", fisher_likelihood, _LIKELIHOODS)
        self._entries: list[_Entry] = []
        self._module: LightningModule | None = None
        self._current: _Entry | None = None
        self._evaluations = 0
        self._outputs: Any = None
        self._frozen: ExitStack | None = None
        self._kernels: ExitStack | None = None  # derivative kernels around a create_graph training batch
        self._backward_shadowed = False
        self._snapshot: SVRGSnapshot | None = None

    @property
    def active(self) -> bool:
        """Whether this adapter serves optimizers of the current fit (another one on the Trainer may)."""
        return bool(self._entries)

    # ------------------------------------------------------------------------------------------ set-up

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._release()
        first = next(cb for cb in trainer.callbacks if isinstance(cb, OptimizerLoopAdapter))
        if first is not self:  # the entry point's and the user's: the first one serves
            return
        entries = []
        for optimizer in trainer.optimizers:
            needs = loop.loop_needs(optimizer)
            if needs:
                found = loop.spec_of(optimizer)
                name = found[0] if found is not None else type(optimizer).__name__
                entries.append(_Entry(optimizer, name, needs))
        if not entries:
            return
        for entry in entries:
            if "repeated_evaluations" not in entry.needs:
                continue
            accumulate = getattr(trainer, "accumulate_grad_batches", 1)
            if accumulate > 1:
                raise ValueError(
                    f"optimizer {entry.name!r} evaluates the closure several times per step, which cannot be "
                    f"combined with gradient accumulation (accumulate_grad_batches={accumulate}): only the last "
                    "micro-batch would be seen by the later evaluations. Use a larger batch size instead."
                )
            if str(getattr(trainer, "precision", "")) == "16-mixed":
                raise ValueError(
                    f"optimizer {entry.name!r} needs the closure in step(), but precision='16-mixed' steps "
                    "through a GradScaler that calls the closure itself and steps without it; use "
                    "precision='bf16-mixed' or 32-bit"
                )
        self._module = pl_module
        self._entries = entries
        for entry in entries:
            loop.adopt(entry.optimizer)
            entry.handles.append(entry.optimizer.register_step_pre_hook(self._step_pre_hook(entry)))
            entry.handles.append(entry.optimizer.register_step_post_hook(self._step_post_hook))
            if "fisher_sampling" in entry.needs:
                entry.model = loop.model_of(entry.optimizer) or pl_module
                entry.handles.append(entry.model.register_forward_hook(self._output_hook(entry)))
        if any("create_graph" in e.needs for e in entries):
            original = pl_module.backward

            def backward(loss: Tensor, *args: Any, **kwargs: Any) -> None:
                kwargs.setdefault("create_graph", True)
                original(loss, *args, **kwargs)

            pl_module.__dict__["backward"] = backward
            self._backward_shadowed = True
        wants_snapshot = any("snapshot" in e.needs for e in entries)
        if wants_snapshot and not any(isinstance(cb, SVRGSnapshot) for cb in trainer.callbacks):
            self._snapshot = SVRGSnapshot()
            self._snapshot.on_fit_start(trainer, pl_module)

    def _release(self) -> None:
        self._unfreeze()
        self._close_kernels()
        for entry in self._entries:
            loop.release(entry.optimizer)
            for handle in entry.handles:
                handle.remove()
        self._entries = []
        if self._backward_shadowed and self._module is not None:
            self._module.__dict__.pop("backward", None)
        self._backward_shadowed = False
        self._module = None
        self._current = None
        self._snapshot = None

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._release()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release()

    # ---------------------------------------------------------------------------------- within a step

    def _step_pre_hook(self, entry: _Entry) -> Callable[..., None]:
        def hook(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
            self._unfreeze()
            self._current, self._evaluations, self._outputs = entry, 0, None

        return hook

    def _step_post_hook(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self._unfreeze()
        self._current, self._outputs = None, None

    def _output_hook(self, entry: _Entry) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if self._current is entry and self._evaluations == 0 and self._outputs is None and module.training:
                self._outputs = output

        return hook

    def _unfreeze(self) -> None:
        if self._frozen is not None:
            frozen, self._frozen = self._frozen, None
            frozen.close()

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        entry = self._current
        if entry is None or self._evaluations or "fisher_sampling" not in entry.needs:
            return
        outputs = self._outputs
        if not isinstance(outputs, Tensor) or not outputs.requires_grad:
            got = "no forward call" if outputs is None else f"a {type(outputs).__name__}"
            raise RuntimeError(
                f"optimizer {entry.name!r} (fisher='mc') samples its Fisher from the network's outputs, but "
                f"{type(entry.model).__name__}'s forward gave {got} in this training step, not a tensor of "
                "logits with a graph. Pass model=<the module whose forward returns the logits> to "
                "create_optimizer, or use fisher='empirical'."
            )
        if self.fisher_likelihood == "categorical" and (outputs.ndim < 2 or outputs.shape[-1] < 2):
            raise ValueError(
                f"optimizer {entry.name!r} (fisher='mc') cannot sample class labels from outputs of shape "
                f"{tuple(outputs.shape)}; for a regression pass "
                "OptimizerLoopAdapter(fisher_likelihood='gaussian')"
            )
        entry.optimizer.sample_fisher(outputs, self.fisher_likelihood)  # type: ignore[attr-defined]
        self._outputs = None

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        entry = self._current
        if entry is None:
            return
        self._evaluations += 1
        if self._evaluations != 1:
            return
        if "create_graph" in entry.needs:
            grads = [p.grad for g in entry.optimizer.param_groups for p in g["params"] if p.grad is not None]
            if grads and not any(g.requires_grad for g in grads):
                raise RuntimeError(
                    f"optimizer {entry.name!r} needs the backward pass to keep its graph (create_graph=True), "
                    f"but the gradients have none: {type(pl_module).__name__}.backward does not pass its "
                    "keyword arguments on. Let it call `loss.backward(*args, **kwargs)` (or "
                    "`super().backward(loss, *args, **kwargs)`)."
                )
        if "repeated_evaluations" in entry.needs:
            stack = ExitStack()
            stack.enter_context(frozen_batchnorm_stats(pl_module))
            stack.enter_context(_Muted(pl_module))
            self._frozen = stack

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # A backward with create_graph differentiates the backward itself: fused attention (SDPA's flash and
        # efficient kernels, the encoder's fast path) and fused RNN kernels have no double backward, so the
        # batch runs through the kernels that do, as the curvature engine's products do.
        if self._backward_shadowed and self._kernels is None:
            stack = ExitStack()
            stack.enter_context(derivative_kernels(pl_module))
            self._kernels = stack

    def _close_kernels(self) -> None:
        if self._kernels is not None:
            kernels, self._kernels = self._kernels, None
            kernels.close()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # The step post-hook has already undone everything; this is a safety net for a step that was
        # never completed (``training_step`` returned None on a later evaluation, for example).
        self._unfreeze()
        self._close_kernels()
        self._current = None

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._snapshot is not None:
            self._snapshot.on_train_epoch_start(trainer, pl_module)


def callbacks_factory() -> list[Callback]:
    """Lightning's ``lightning.pytorch.callbacks_factory`` entry point: an adapter for every Trainer."""
    return [OptimizerLoopAdapter()]


# ------------------------------------------------------------------------------------------------ SVRG

def _default_loss(pl_module: LightningModule, batch: Any, batch_idx: int) -> Tensor:
    """The mean training loss of a batch: ``compute_loss(batch)``, else ``training_step``'s loss, unlogged."""
    compute = getattr(pl_module, "compute_loss", None)
    if callable(compute):
        return compute(batch)
    with _Muted(pl_module):
        out = pl_module.training_step(batch, batch_idx)
    loss = out.get("loss") if isinstance(out, dict) else out
    if not isinstance(loss, Tensor):
        raise ValueError(
            f"SVRGSnapshot computes the full gradient from {type(pl_module).__name__}.training_step, which "
            f"returned {type(out).__name__} for batch {batch_idx}; define compute_loss(self, batch) returning "
            "the mean loss of a batch, or pass SVRGSnapshot(loss_fn=...)"
        )
    return loss


class SVRGSnapshot(Callback):
    """Take SVRG's snapshot and full training gradient at the start of every ``every_n_epochs``-th epoch.

    The full gradient is the size-weighted mean of the batch gradients over the whole training set (a
    sequential pass over the train loader's dataset, so the training shuffle is not disturbed), computed in
    train mode with BatchNorm running statistics left untouched. Under DDP every rank computes it over the
    whole dataset, so the ranks agree without communication. :class:`OptimizerLoopAdapter` runs one
    (``every_n_epochs=1``) when none is attached.

    Args:
        every_n_epochs: Epochs between snapshots (>= 1).
        loss_fn: ``loss_fn(pl_module, batch) -> Tensor``, the mean loss of a batch; defaults to
            ``pl_module.compute_loss(batch)`` when the module has it, else the loss ``training_step``
            returns (with its logging muted).
        batch_size: Batch size of the full-gradient pass (default: the train loader's).

    Raises:
        TypeError: For an ``every_n_epochs``/``batch_size`` that is not an integer or a ``loss_fn`` that is not
            callable.
        ValueError: For an ``every_n_epochs``/``batch_size`` below 1, or at fit start when no SVRG optimizer is
            configured or the train loader is not a single ``DataLoader``.

    References:
        Johnson & Zhang 2013, papers.nips.cc/paper/4937.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        loss_fn: Callable[[LightningModule, Any], Tensor] | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs)
        self.batch_size = check_optional(check_int, "batch_size", batch_size)
        self.loss_fn = check_optional(check_callable, "loss_fn", loss_fn, signature="loss_fn(pl_module, batch)")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_epochs=self.every_n_epochs)

    @staticmethod
    def _optimizers(trainer: Trainer) -> list[SVRG]:
        return [opt for opt in trainer.optimizers if isinstance(opt, SVRG)]

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._optimizers(trainer):
            raise ValueError("SVRGSnapshot is attached but no configured optimizer is an SVRG instance")

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch % self.every_n_epochs:
            return
        optimizers = [opt for opt in self._optimizers(trainer) if opt.snapshot_tag != epoch]
        if not optimizers:  # resumed inside an epoch whose snapshot the checkpoint already holds
            return
        loader = trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise ValueError(f"SVRGSnapshot needs a single DataLoader for training, got {type(loader).__name__}")
        sequential = DataLoader(loader.dataset, batch_size=self.batch_size or loader.batch_size or 1,
                                shuffle=False, collate_fn=loader.collate_fn)
        total = len(loader.dataset)  # type: ignore[arg-type]
        params = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
        for p in params:
            p.grad = None
        was_training = pl_module.training
        pl_module.train()
        try:
            with torch.enable_grad(), frozen_batchnorm_stats(pl_module):
                for index, batch in enumerate(sequential):
                    batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                    size = extract_batch_size(batch)
                    if self.loss_fn is not None:
                        loss = self.loss_fn(pl_module, batch)
                    else:
                        loss = _default_loss(pl_module, batch, index)
                    (loss * (size / total)).backward()
            for opt in optimizers:
                opt.snapshot(tag=epoch)
        finally:
            for p in params:
                p.grad = None
            pl_module.train(was_training)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"every_n_epochs": self.every_n_epochs}
