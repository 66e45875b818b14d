"""Measuring without side effects: the context, the fixed measurement subset, and the cadence.

Every measuring callback (Hessian spectrum, sharpness, generalization gap, gradient noise, ...) runs extra
forward and backward passes in the middle of training. Training with such a callback attached must be
*bitwise identical* to training without it, so everything a measurement could touch is saved and restored
here, in one place, rather than by each callback.

How a callback uses this module (the whole API)::

    from lightning_optsurvey.callbacks._measure import MeasuringCallback

    class MyMeasure(MeasuringCallback):
        def __init__(self, radius: float = 0.05, **kwargs):        # kwargs: every_n_epochs, every_n_steps,
            super().__init__(**kwargs)                              #   num_batches, seed
            self.radius = radius

        def state_key_config(self) -> dict:                        # what tells two instances apart
            return {**super().state_key_config(), "radius": self.radius}

        def measure(self, trainer, pl_module, batches) -> dict[str, float]:
            # Runs inside `measuring(pl_module)`: grad on, inference mode and autocast off, and
            # everything (parameters, .grad, buffers, modes, RNG) restored afterwards. `batches` is the
            # fixed list of train batches (any structure) on the module's device, drawn once.
            loss_fn = resolve_loss_fn(pl_module, None)  # ModuleLoss() with compute_loss
            ...
            return {"my/metric": value}

The base class calls ``measure`` at the end of every ``every_n_epochs``-th training epoch and/or after
every ``every_n_steps``-th optimizer step, then logs the returned metrics to every logger (rank 0), keeps
them in ``trainer.callback_metrics`` and in ``callback.history``. Lower-level pieces, usable alone:

- :func:`measuring` (context manager): saves and restores, around any code, the parameters (values and
  ``requires_grad``), their ``.grad``, the buffers (BatchNorm running statistics), every submodule's
  train/eval flag, the CPU, CUDA, Python and NumPy RNG states; inside it grad is enabled, inference mode
  and autocast are off, and attention runs on SDPA's math backend (it has the double backward that
  Hessian products need; fused kernels do not). Tensors are restored *in place* (same objects), so
  optimizers, DDP bucket views and anything else holding references keeps working.
- :func:`unwrap_module`: the LightningModule (or plain module) under DDP / Lightning wrappers.
- :func:`draw_batches`: ``num_batches`` batches drawn from a *dataset* with the caller's own
  ``torch.Generator``. It never iterates the trainer's train loader: that would advance the loader's
  shuffling generator and change the order of the training data.
- :func:`train_measurement_batches`: the same, reading dataset, batch size and collate function off
  ``trainer.train_dataloader``, sharded over ranks (each rank gets different samples).
- :class:`Cadence`: the ``every_n_epochs`` / ``every_n_steps`` rule.
- :func:`resolve_loss_fn`: the loss a measurement uses: the callback's own ``loss_fn`` if given, else
  the module's ``compute_loss(batch)`` if it defines one (any batch structure), else
  ``pl_module.loss_fn`` or cross-entropy on ``(inputs, targets)`` batches.

Why our own: Lightning has no notion of a side-effect-free measurement, and tools such as PyHessian change
the model (switch it to eval mode, leave graph-carrying ``.grad`` behind).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from typing_extensions import override

from lightning_optsurvey import _compat
from lightning_optsurvey.curvature.kernels import derivative_kernels
from lightning_optsurvey.curvature.objective import BatchLoss, ModuleLoss, as_batch_loss
from lightning_optsurvey.validation import check_bool, check_callable, check_int, check_optional

__all__ = [
    "Cadence",
    "MeasuringCallback",
    "check_loss_fn",
    "draw_batches",
    "measuring",
    "resolve_loss_fn",
    "train_measurement_batches",
    "unwrap_module",
]

LossFn = Callable[[Any, Any], Tensor] | BatchLoss


# ----------------------------------------------------------------------------------------------------------
# The context
# ----------------------------------------------------------------------------------------------------------
def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        states["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "numpy" in states:
        import numpy as np

        np.random.set_state(states["numpy"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


@contextmanager
def measuring(module: nn.Module) -> Iterator[nn.Module]:
    """Run a measurement on ``module`` and leave no trace of it.

    On entry it snapshots, for ``module`` and all its submodules: parameter values and ``requires_grad``,
    ``.grad`` (or its absence), buffers, the ``training`` flag of every submodule, and the CPU, CUDA (if
    initialized), Python and NumPy RNG states. Inside, gradients are enabled, inference mode is off and
    autocast is disabled on CPU and CUDA, so a measurement can differentiate even when called from a
    validation hook. On exit (also on error) everything is written back in place: the same tensor
    objects get their old values, so optimizer state and DDP's gradient bucket views stay attached.

    Args:
        module: The module to measure. Wrappers (DDP, Lightning's strategy wrappers) are unwrapped.

    Yields:
        The unwrapped module.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5))
        >>> with measuring(net) as m:
        ...     _ = m.eval()
        ...     _ = m[0].weight.data.zero_()
        ...     m(torch.randn(4, 3)).sum().backward()
        >>> net.training, bool(net[0].weight.abs().sum() > 0), net[0].weight.grad is None
        (True, True, True)
    """
    module = unwrap_module(module)
    subs = list(module.modules())  # once: it hashes every submodule (a torchmetrics Metric hashes its state)
    with torch.inference_mode(False), torch.no_grad():
        params = [
            (sub, name, p, p.detach().clone(), p.requires_grad,
             p.grad, None if p.grad is None else p.grad.detach().clone())
            for sub in subs
            for name, p in sub._parameters.items()
            if p is not None
        ]
        buffers = [
            (sub, name, b, b.detach().clone())
            for sub in subs
            for name, b in sub._buffers.items()
            if b is not None
        ]
    modes = [(sub, sub.training) for sub in subs]
    rng = _rng_states()
    try:
        with ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
            stack.enter_context(derivative_kernels(module))
            yield module
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for sub, name, p, value, requires_grad, grad, grad_value in params:
                sub._parameters[name] = p
                p.copy_(value)
                p.requires_grad_(requires_grad)
                if grad is not None:
                    grad.copy_(grad_value)
                p.grad = grad
            for sub, name, b, value in buffers:
                sub._buffers[name] = b
                b.copy_(value)
        for sub, training in modes:
            sub.training = training
        _set_rng_states(rng)


def unwrap_module(module: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel / Lightning's strategy wrappers (the one to measure)."""
    seen = 0
    while seen < 8:  # wrappers nest at most a few levels
        seen += 1
        if isinstance(module, LightningModule):
            return module
        inner = getattr(module, "_forward_module", None)  # lightning's _LightningModuleWrapperBase
        if isinstance(inner, nn.Module):
            module = inner
            continue
        if isinstance(module, nn.parallel.DistributedDataParallel | nn.DataParallel):
            module = module.module
            continue
        break
    return module


def resolve_loss_fn(pl_module: nn.Module, loss_fn: LossFn | None) -> LossFn:
    """The loss a measurement uses.

    In this order:

    1. ``loss_fn`` if given (the callback's argument: ``loss_fn(outputs, targets)`` or a ``BatchLoss``);
    2. ``ModuleLoss()`` if the module defines ``compute_loss(self, batch) -> Tensor`` (the mean loss of one
       batch of any structure, no logging);
    3. ``pl_module.loss_fn`` if it has one, else cross-entropy, as ``loss_fn(outputs, targets)`` on
       ``(inputs, targets)`` batches.

    Every loss returns the *mean* over the batch.
    """
    if loss_fn is not None:
        return check_loss_fn(loss_fn)
    if callable(getattr(pl_module, "compute_loss", None)):
        return ModuleLoss("compute_loss")
    own = getattr(pl_module, "loss_fn", None)
    return own if callable(own) else F.cross_entropy


def check_loss_fn(loss_fn: LossFn | None) -> LossFn | None:
    """``None`` or a callable ``loss_fn(outputs, targets)`` / ``BatchLoss`` (the callbacks' one check).

    Raises:
        TypeError: If it is neither ``None`` nor callable.
    """
    return check_optional(check_callable, "loss_fn", loss_fn, signature="loss_fn(outputs, targets)")


# ----------------------------------------------------------------------------------------------------------
# The fixed measurement subset
# ----------------------------------------------------------------------------------------------------------
def draw_batches(
    dataset: Dataset,
    num_batches: int,
    batch_size: int,
    *,
    generator: torch.Generator,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
) -> list[Any]:
    """Draw ``num_batches`` batches of ``batch_size`` samples, without replacement, from ``dataset``.

    All ranks draw the same permutation from ``generator`` and each keeps its own slice, so with the same
    seed the ranks hold disjoint shards of one global subset. An ``IterableDataset`` cannot be indexed;
    its first samples are taken from a fresh iterator instead. The batches are built outside inference
    mode (so they can be used for differentiation) and moved to ``device``.

    Args:
        dataset: A map-style dataset (``len`` and ``__getitem__``) or an ``IterableDataset``.
        num_batches: Batches per rank (fewer if the dataset is too small).
        batch_size: Samples per batch.
        generator: The caller's own generator; its state advances, nothing else does.
        collate_fn: How samples become a batch (default: torch's ``default_collate``).
        rank: This process's rank.
        world_size: Number of processes.
        device: Where the batches go.

    Returns:
        A list of collated batches.

    Raises:
        ValueError: If a count is not a positive integer, or the dataset is empty.
    """
    for name, value in (("num_batches", num_batches), ("batch_size", batch_size), ("world_size", world_size)):
        check_int(name, value)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
    collate = collate_fn or torch.utils.data.default_collate
    per_rank = num_batches * batch_size
    with torch.inference_mode(False):
        if isinstance(dataset, IterableDataset):
            samples = []
            seen = 0
            for i, sample in enumerate(dataset):
                if i >= per_rank * world_size:
                    break
                seen += 1
                if i % world_size == rank:
                    samples.append(sample)
            size = f"at least {seen}" if seen == per_rank * world_size else str(seen)
        else:
            n = len(dataset)  # type: ignore[arg-type]
            if n == 0:
                raise ValueError("cannot draw measurement batches from an empty dataset")
            order = torch.randperm(n, generator=generator)
            total = min(per_rank * world_size, n - n % world_size if n >= world_size else n)
            mine = order[:total][rank::world_size]
            samples = [dataset[int(i)] for i in mine]
            size = str(n)
        if not samples:
            raise ValueError(f"rank {rank} got no samples from a dataset of {size} for measurement "
                             f"(world_size={world_size})")
        batches = [collate(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
        batches = [_detach_clone(b) for b in batches]
    return [move_data_to_device(b, device) for b in batches] if device is not None else batches


def _detach_clone(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.detach().clone()
    if isinstance(batch, tuple | list):
        return type(batch)(_detach_clone(b) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _detach_clone(v) for k, v in batch.items()}
    return batch


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The generators that iterating ``loader`` draws from: its own, its sampler's, its batch sampler's sampler's.

    Creating a DataLoader iterator draws the workers' base seed from ``loader.generator`` (the global RNG without
    one), and a ``RandomSampler`` draws its order from its own generator; a data module that gives its training
    and validation loaders one shared generator would otherwise see its training order change when a callback
    iterates the validation loader.
    """
    found: list[torch.Generator] = []
    batch_sampler = getattr(loader, "batch_sampler", None)
    for owner in (loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


@contextmanager
def loader_rng_preserved(loader: Any) -> Iterator[None]:
    """Iterate ``loader`` inside without moving the generators it draws from (see :func:`loader_generators`)."""
    generators = loader_generators(loader)
    states = [g.get_state() for g in generators]
    try:
        yield
    finally:
        for generator, state in zip(generators, states):
            generator.set_state(state)


def _first_dataloader(loaders: Any) -> DataLoader | None:
    if isinstance(loaders, DataLoader):
        return loaders
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, Sequence):
        for item in loaders:
            found = _first_dataloader(item)
            if found is not None:
                return found
    return None


def train_measurement_batches(
    trainer: Trainer, num_batches: int, generator: torch.Generator, device: torch.device | None = None
) -> list[Any]:
    """The measurement subset: ``num_batches`` batches per rank from the *dataset* of the train loader.

    Reads the dataset, batch size and collate function of ``trainer.train_dataloader`` (available from
    ``on_train_start``) and calls :func:`draw_batches`; the trainer's loader itself is never iterated.

    Raises:
        RuntimeError: If the trainer has no train dataloader yet (called before ``on_train_start``).
    """
    loader = _first_dataloader(trainer.train_dataloader)
    if loader is None:
        raise RuntimeError(
            "the trainer has no train DataLoader to draw measurement batches from; measurements run "
            "during fit, from on_train_start on"
        )
    batch_size = loader.batch_size
    if batch_size is None:
        batch_size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None) or 1
    return draw_batches(
        loader.dataset,
        num_batches,
        batch_size,
        generator=generator,
        collate_fn=loader.collate_fn,
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        device=device,
    )


# ----------------------------------------------------------------------------------------------------------
# Cadence and the base callback
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cadence:
    """When to measure: after every ``every_n_epochs``-th epoch, every ``every_n_steps``-th step, at fit end.

    Args:
        every_n_epochs: Measure at the end of epochs ``n-1, 2n-1, ...`` (0-based), or never if ``None``.
        every_n_steps: Measure after optimizer steps ``n, 2n, ...`` (``trainer.global_step``), or never.
        at_fit_end: Also measure once when training ends (``on_train_end``: the last epoch, ``max_steps``
            or an early stop), unless a measurement already ran after that step. With only this set, a
            run pays for one measurement whatever its length (the cheap default of ``optsurvey compare``).

    Raises:
        TypeError: If a value has the wrong type.
        ValueError: If a count is not positive, or nothing is set (both counts ``None``, no ``at_fit_end``).
    """

    every_n_epochs: int | None = 1
    every_n_steps: int | None = None
    at_fit_end: bool = False

    def __post_init__(self) -> None:
        check_optional(check_int, "every_n_epochs", self.every_n_epochs)
        check_optional(check_int, "every_n_steps", self.every_n_steps)
        check_bool("at_fit_end", self.at_fit_end)
        if self.every_n_epochs is None and self.every_n_steps is None and not self.at_fit_end:
            raise ValueError("at least one of every_n_epochs and every_n_steps must be set (or at_fit_end=True), "
                             "got both None")

    def due_at_epoch_end(self, epoch: int) -> bool:
        """Whether to measure at the end of (0-based) ``epoch``."""
        return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0

    def due_at_step(self, global_step: int) -> bool:
        """Whether to measure once ``global_step`` optimizer steps have been taken."""
        return self.every_n_steps is not None and global_step > 0 and global_step % self.every_n_steps == 0


@dataclass(frozen=True)
class _GeneratorState:
    """A ``torch.Generator`` in picklable form: its device and its state as bytes."""

    device: str
    state: bytes

    def restore(self) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.set_state(torch.frombuffer(bytearray(self.state), dtype=torch.uint8))
        return generator


class MeasuringCallback(Callback):
    """Base of the measuring callbacks: cadence, fixed subset, side-effect-free context, logging.

    Subclasses implement :meth:`measure` (and extend :meth:`state_key_config`, and ``state_dict`` /
    ``load_state_dict`` calling ``super()`` when they keep state). See the module docstring.

    Args:
        every_n_epochs: Measure after every n-th training epoch (``None``: never at epoch ends).
        every_n_steps: Measure after every n-th optimizer step (``None``: never at steps).
        num_batches: Size of the fixed measurement subset, in batches of the train loader's batch size,
            per rank.
        seed: Seed of the callback's own generator (draws the subset; subclasses may use it further).
        at_fit_end: Also measure once when training ends (see :class:`Cadence`).

    Raises:
        TypeError: For a count, seed or flag of the wrong type.
        ValueError: For a cadence that is not a positive integer or ``None`` (or nothing set), or a
            ``num_batches`` that is not a positive integer.
    """

    def __init__(
        self,
        *,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        num_batches: int = 1,
        seed: int = 0,
        at_fit_end: bool = False,
    ) -> None:
        super().__init__()
        self.cadence = Cadence(every_n_epochs, every_n_steps, at_fit_end)
        check_int("num_batches", num_batches)
        check_int("seed", seed, low=None)
        self.num_batches = num_batches
        self.seed = seed
        self.history: list[dict[str, float]] = []
        self._batches: list[Any] | None = None
        self._last_step_measured = -1
        self._batch_checked = False
        self.trigger = "epoch"  # what started the current/last measurement: "step", "epoch" or "end"

    # -- pickling (ddp_spawn sends the callbacks to the worker processes) ---------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # A generator attribute (a subclass's own stream of draws) travels as its device and state bytes,
        # not through torch.multiprocessing's tensor-sharing reductions; restored bit for bit.
        state = self.__dict__.copy()
        for name, value in state.items():
            if isinstance(value, torch.Generator):
                state[name] = _GeneratorState(str(value.device), bytes(value.get_state().numpy()))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(
            {name: value.restore() if isinstance(value, _GeneratorState) else value for name, value in state.items()}
        )

    # -- configuration -----------------------------------------------------------------------------------
    def state_key_config(self) -> dict[str, Any]:
        """The configuration that identifies this instance (extend in subclasses)."""
        config = {
            "every_n_epochs": self.cadence.every_n_epochs,
            "every_n_steps": self.cadence.every_n_steps,
            "num_batches": self.num_batches,
            "seed": self.seed,
        }
        if self.cadence.at_fit_end:  # only when set, so existing state keys (and checkpoints) stay valid
            config["at_fit_end"] = True
        return config

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads the key on every hook call of every callback (about 7 per training step each, 0.6k
        # reads per callback in a 5-epoch digits run): kept once built, dropped whenever an attribute is set
        # (the configuration lives in attributes, see __setattr__), so it is never stale.
        key = self.__dict__.get("_state_key_cache")
        if key is None:
            key = self._generate_state_key(**self.state_key_config())
            self.__dict__["_state_key_cache"] = key
        return key

    def __setattr__(self, name: str, value: Any) -> None:
        self.__dict__.pop("_state_key_cache", None)
        super().__setattr__(name, value)

    # -- what subclasses implement -----------------------------------------------------------------------
    def measure(self, trainer: Trainer, pl_module: LightningModule, batches: list[Any]) -> dict[str, float]:
        """Compute the metrics; runs inside :func:`measuring`. Returns ``{name: value}``."""
        raise NotImplementedError

    # -- machinery -----------------------------------------------------------------------------------------
    def measurement_batches(self, trainer: Trainer, pl_module: LightningModule) -> list[Any]:
        """The fixed subset (drawn on first use with ``seed``; identical after a resume)."""
        if self._batches is None:
            generator = torch.Generator().manual_seed(self.seed)
            count = self.batches_to_draw(trainer)
            self._batches = train_measurement_batches(trainer, count, generator, pl_module.device)
        return self._batches

    def batches_to_draw(self, trainer: Trainer) -> int:
        """Batches per rank in the fixed subset: ``num_batches`` (a subclass may derive it from the data)."""
        return self.num_batches

    def run_measurement(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Measure now (inside the context), log, record in ``history``, and return the metrics."""
        from lightning_optsurvey.callbacks.divergence import nonfinite_reason

        module = trainer.lightning_module if trainer.lightning_module is not None else pl_module
        # A non-finite point (a diverged run) is skipped and reported, never a reason to raise.
        if (reason := nonfinite_reason(trainer, module)) is not None:
            return self._skip_nonfinite(trainer, reason)
        try:
            with measuring(module) as unwrapped:
                measured = cast(LightningModule, unwrapped)  # unwrap_module stops at the LightningModule
                batches = self.measurement_batches(trainer, measured)
                metrics = {k: float(v) for k, v in self.measure(trainer, measured, batches).items()}
        except Exception as err:
            if (reason := nonfinite_reason(trainer, module)) is None:
                raise
            return self._skip_nonfinite(trainer, f"{reason}; the measurement failed with {type(err).__name__}")
        if bad := sorted(k for k, v in metrics.items() if not math.isfinite(v)):
            rank_zero_warn(f"{type(self).__name__} measured non-finite {bad} at step {trainer.global_step}; "
                           "logged as measure/skipped_nonfinite instead", category=RuntimeWarning)
            metrics = {k: v for k, v in metrics.items() if k not in bad}
            metrics["measure/skipped_nonfinite"] = float(len(bad))
        self.log_metrics(trainer, metrics)
        where = {"epoch": float(trainer.current_epoch), "step": float(trainer.global_step)}
        self.history.append({**where, **metrics})
        return metrics

    def _skip_nonfinite(self, trainer: Trainer, reason: str) -> dict[str, float]:
        """Log that the measurement at this point was skipped (``measure/skipped_nonfinite``), warn once."""
        if not getattr(self, "_warned_nonfinite", False):
            self._warned_nonfinite = True
            rank_zero_warn(f"{type(self).__name__} skips its measurements from step {trainer.global_step}: "
                           f"{reason}", category=RuntimeWarning)
        metrics = {"measure/skipped_nonfinite": 1.0}
        self.log_metrics(trainer, metrics)
        self.history.append({"epoch": float(trainer.current_epoch), "step": float(trainer.global_step),
                             "skipped_nonfinite": 1.0})
        return {}

    def log_metrics(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Write to every logger (they write on rank 0 only) and to ``trainer.callback_metrics``."""
        for name, value in metrics.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        if trainer.is_global_zero:
            step = _compat.logging_step(trainer)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def uses_loss(self) -> bool:
        """Whether a measurement evaluates the loss on batches (default: the callback has a ``loss_fn``)."""
        return hasattr(self, "loss_fn")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._batch_checked = False  # once per fit: a later fit may bring another module or other batches

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """At the first training batch, check that the loss the measurements use can take its structure.

        A dict batch without ``compute_loss`` on the module fails here, before the first step, rather than at
        the first measurement an epoch later. Structure only: nothing is computed.
        """
        if self._batch_checked:
            return
        self._batch_checked = True
        if self.uses_loss():
            loss = as_batch_loss(resolve_loss_fn(pl_module, getattr(self, "loss_fn", None)))
            try:
                loss.check_batches([batch])
            except ValueError as err:
                raise ValueError(f"{type(self).__name__} measures the loss on this run's training batches, and "
                                 f"{str(err).replace('batch 0', 'the first training batch', 1)}") from err
        self.check_batch(pl_module, batch)

    def check_batch(self, pl_module: LightningModule, batch: Any) -> None:
        """Raise if a measurement cannot take batches like ``batch`` (the first training batch of a fit).

        Called once per fit before the first step, after the loss check of :meth:`uses_loss`; structure only,
        nothing is computed. The default checks nothing more.
        """

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.cadence.due_at_step(step) and step != self._last_step_measured:
            self._last_step_measured = step  # gradient accumulation: one measurement per optimizer step
            self.trigger = "step"
            self.run_measurement(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Skipped when a step-cadence measurement already ran after this epoch's last step.
        if self.cadence.due_at_epoch_end(trainer.current_epoch) and trainer.global_step != self._last_step_measured:
            self._last_step_measured = trainer.global_step
            self.trigger = "epoch"
            self.run_measurement(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.cadence.at_fit_end and trainer.global_step != self._last_step_measured:
            self._last_step_measured = trainer.global_step
            self.trigger = "end"
            self.run_measurement(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history], "last_step_measured": self._last_step_measured}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self._last_step_measured = int(state_dict.get("last_step_measured", -1))
