"""Exact resume with random layers: the global RNG states travel with the checkpoint.

Lightning checkpoints the model, the optimizers, the schedulers, the loops and stateful data loaders, but
not the global random number generators (torch's CPU and CUDA generators, NumPy's, Python's ``random``):
``seed_everything`` seeds them once, at the start. A run resumed from a checkpoint therefore draws
different dropout masks (and different noise in noisy optimizers such as Entropy-SGD or LPF-SGD) than the
uninterrupted run, and the two drift apart. :class:`ResumeRNG` adds them to every checkpoint and restores
them on resume.

When: the states are collected when the checkpoint is written and restored where the uninterrupted run
continues, not when the checkpoint is loaded (in between, Lightning builds data loaders and may run a
sanity check, which the uninterrupted run did not do at that point). A checkpoint written inside an epoch
is restored just before the next training batch; one written at an epoch's end (its last batch done) at
the start of the next epoch, before any ``on_train_epoch_start`` hook that draws random numbers (SVRG's
full-gradient snapshot through dropout layers). A loader that draws from the global generator when its
iterator is created (torch's ``DataLoader`` without its own ``generator``) still shifts the state at epoch
boundaries; give it a ``generator`` (as :class:`~lightning_optsurvey.tasks.DigitsDataModule` does). Put
this callback before others that draw random numbers at epoch start (``ClassifierModule`` does).

With several processes every rank's states are gathered into the checkpoint (all ranks write
checkpoints together in Lightning, so the gather is one more collective of the same save), and each rank
restores its own. :class:`~lightning_optsurvey.tasks.ClassifierModule` and ``optsurvey fit`` attach this
callback by default; add ``ResumeRNG()`` to ``Trainer(callbacks=...)`` for your own module.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_optsurvey._compat import is_last_batch

__all__ = ["ResumeRNG", "get_rng_states", "set_rng_states"]


def get_rng_states() -> dict[str, Any]:
    """The global RNG states of this process: torch CPU, every initialized CUDA device, NumPy, Python."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # Tensors, ints and tuples only: checkpoints load with ``torch.load(weights_only=True)``.
    states: dict[str, Any] = {"torch": torch.get_rng_state(),
                              "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                                        float(cached)),
                              "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore states returned by :func:`get_rng_states` (CUDA only where it was saved and is present)."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumeRNG(Callback):
    """Save the global RNG states of every rank in checkpoints; restore them at the first batch after resume.

    Attributes:
        restored: Whether the states of a loaded checkpoint have been put back (``None``: nothing loaded).
    """

    def __init__(self) -> None:
        super().__init__()
        self._per_rank: list[dict[str, Any]] | None = None
        self._at_epoch_end = False
        self.restored: bool | None = None

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        own = get_rng_states()
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, own)
        else:
            gathered = [own]
        # Lightning calls ``state_dict`` before this hook: the states go into the callback's entry here.
        at_epoch_end = is_last_batch(trainer)
        checkpoint.setdefault("callbacks", {})[self.state_key] = {"per_rank": gathered, "at_epoch_end": at_epoch_end}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {}  # filled in by on_save_checkpoint, which knows the trainer (ranks)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        per_rank = state_dict.get("per_rank")
        if per_rank:
            self._per_rank = per_rank
            self._at_epoch_end = bool(state_dict.get("at_epoch_end", False))
            self.restored = False

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._at_epoch_end:
            self._restore(trainer)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._restore(trainer)

    def _restore(self, trainer: Trainer) -> None:
        if self.restored is not False or not self._per_rank:
            return
        rank = trainer.global_rank
        if len(self._per_rank) != trainer.world_size:
            rank_zero_warn(f"the checkpoint holds RNG states of {len(self._per_rank)} rank(s), this run has "
                           f"{trainer.world_size}; every rank continues from rank 0's states", category=UserWarning)
            rank = 0
        set_rng_states(self._per_rank[rank])
        self.restored = True
