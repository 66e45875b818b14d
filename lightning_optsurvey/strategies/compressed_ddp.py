r"""DDP with torch's gradient-compression hooks (fp16, bf16, PowerSGD) and exact byte accounting.

:class:`CompressedDDPStrategy` is Lightning's :class:`~lightning.pytorch.strategies.DDPStrategy` with one
of torch's DDP communication hooks registered (``torch.distributed.algorithms.ddp_comm_hooks``): the
compression itself is torch's, unchanged. What it adds is ``comm/bytes_sent``, logged per step like the
gossip strategies': the hook is wrapped so that every all-reduce it issues is counted as a ring
all-reduce of the tensor it sends (:math:`2 (N-1)/N` times its bytes):

- ``"none"`` (``allreduce_hook``): each gradient bucket, in its own dtype.
- ``"fp16"`` / ``"bf16"`` (``fp16_compress_hook`` / ``bf16_compress_hook``): each bucket cast to 16
  bits, 2 bytes per element.
- ``"powersgd"`` (``powerSGD_hook``, Vogels et al. 2019): a plain all-reduce of the bucket for the
  first ``start_powersgd_iter`` steps; then, per bucket, three all-reduces: the gradients that are not
  worth compressing (decided by torch's own ``_should_compress`` with ``min_compression_rate``), the
  ``P`` factors (:math:`n r` per :math:`n \times m` matrix) and the ``Q`` factors (:math:`m r`). The
  sizes come from the bucket's gradient shapes and the same decision function the hook calls, before
  the hook runs; error feedback and warm start are torch's defaults (on).

Registered names: ``"ddp_fp16"``, ``"ddp_bf16"``, ``"ddp_powersgd"`` (rank 1, PowerSGD from step 10).

Lightning registers DDP communication hooks on CUDA devices only; this strategy registers its hook on
every device (gloo runs them on the CPU).

Why our own: torch's hooks count nothing (``PowerSGDState.compression_stats`` counts elements, not the
messages, and the fp16 hooks count nothing); Lightning passes hooks through but has no byte metric.

References:
    Vogels, Karimireddy & Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression for Distributed
    Optimization", NeurIPS 2019, arXiv:1905.13727.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
from torch.optim import Optimizer
from typing_extensions import override

from lightning_optsurvey.strategies._comm import CommCounter
from lightning_optsurvey.validation import check_int

__all__ = ["COMPRESSED_DDP_STRATEGY_NAMES", "DDP_COMPRESSIONS", "CompressedDDPStrategy"]

DDP_COMPRESSIONS: tuple[str, ...] = ("none", "fp16", "bf16", "powersgd")
COMPRESSED_DDP_STRATEGY_NAMES: dict[str, str] = {
    "ddp_fp16": "fp16",
    "ddp_bf16": "bf16",
    "ddp_powersgd": "powersgd",
}
"""Registered ``Trainer(strategy=...)`` names and the compression each one uses."""
_LOGGING_HOOKS = frozenset({"optimizer_step", "training_step"})


def _group_size(group: dist.ProcessGroup | None) -> int:
    return (group if group is not None else dist.group.WORLD).size()


class CompressedDDPStrategy(DDPStrategy):
    """DDP whose gradient all-reduce goes through a torch compression hook, with ``comm/bytes_sent``.

    Args:
        compression: ``"none"``, ``"fp16"``, ``"bf16"`` or ``"powersgd"``.
        matrix_approximation_rank: PowerSGD's rank ``r``.
        start_powersgd_iter: Steps of plain all-reduce before PowerSGD starts (torch requires >= 2 with
            error feedback).
        min_compression_rate: PowerSGD compresses a matrix only if it saves more than this factor.
        **kwargs: Everything else :class:`~lightning.pytorch.strategies.DDPStrategy` takes, except the
            communication-hook arguments (this class sets them).

    Raises:
        ValueError: For an unknown compression or out-of-range PowerSGD settings.
        TypeError: For communication-hook keywords (``ddp_comm_hook``, ``ddp_comm_state``,
            ``ddp_comm_wrapper``) or arguments of the wrong type.

    Example:
        >>> import lightning_optsurvey  # registers "ddp_fp16", "ddp_bf16", "ddp_powersgd"
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(accelerator="cpu", devices=4, strategy="ddp_powersgd")  # doctest: +SKIP
    """

    def __init__(
        self,
        compression: str = "powersgd",
        *,
        matrix_approximation_rank: int = 1,
        start_powersgd_iter: int = 10,
        min_compression_rate: float = 2.0,
        **kwargs: Any,
    ) -> None:
        if compression not in DDP_COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}; known: {', '.join(DDP_COMPRESSIONS)}")
        hook_keys = sorted({"ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper"} & set(kwargs))
        if hook_keys:
            raise TypeError(
                f"CompressedDDPStrategy sets the DDP communication hook itself; it does not take {hook_keys}"
            )
        check_int("matrix_approximation_rank", matrix_approximation_rank, low=1)
        check_int("start_powersgd_iter", start_powersgd_iter, low=2)
        if isinstance(min_compression_rate, bool) or not isinstance(min_compression_rate, (int, float)):
            raise TypeError(f"min_compression_rate must be a number, got {min_compression_rate!r}")
        if not 1.0 <= min_compression_rate < float("inf"):
            raise ValueError(f"min_compression_rate must be a finite number >= 1, got {min_compression_rate!r}")
        self.compression = compression
        self.matrix_approximation_rank = matrix_approximation_rank
        self.start_powersgd_iter = start_powersgd_iter
        self.min_compression_rate = float(min_compression_rate)
        self.comm = CommCounter()
        self.powersgd_state: powersgd.PowerSGDState | None = None
        super().__init__(**kwargs)

    @override
    def _register_ddp_hooks(self) -> None:
        # Lightning registers communication hooks on CUDA only (a torch 1.8 restriction); gloo runs them too.
        assert isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        self.model.register_comm_hook(state=None, hook=self._counting_hook)

    # ----------------------------------------------------------------------------------------------
    # The hook: torch's, wrapped to count what it sends
    # ----------------------------------------------------------------------------------------------
    def _powersgd_state(self) -> powersgd.PowerSGDState:
        if self.powersgd_state is None:
            self.powersgd_state = powersgd.PowerSGDState(
                process_group=None,
                matrix_approximation_rank=self.matrix_approximation_rank,
                start_powerSGD_iter=self.start_powersgd_iter,
                min_compression_rate=self.min_compression_rate,
            )
        return self.powersgd_state

    def _counting_hook(self, state, bucket):
        """Count the bytes of the all-reduces the chosen torch hook issues for ``bucket``, then run it."""
        group = state if isinstance(state, dist.ProcessGroup) else None
        size = _group_size(group)
        buffer = bucket.buffer()
        if self.compression == "none":
            self.comm.add_all_reduce(buffer.numel() * buffer.element_size(), size)
            return default_hooks.allreduce_hook(group, bucket)
        if self.compression in ("fp16", "bf16"):
            self.comm.add_all_reduce(buffer.numel() * 2, size)
            hook = default_hooks.fp16_compress_hook if self.compression == "fp16" else default_hooks.bf16_compress_hook
            return hook(group, bucket)
        ps = self._powersgd_state()
        for nbytes in self._powersgd_messages(ps, bucket):
            self.comm.add_all_reduce(nbytes, size)
        return powersgd.powerSGD_hook(ps, bucket)

    @staticmethod
    def _powersgd_messages(state: powersgd.PowerSGDState, bucket: dist.GradBucket) -> list[int]:
        """Bytes of each all-reduce ``powerSGD_hook`` issues for ``bucket`` at ``state.iter``."""
        buffer = bucket.buffer()
        itemsize = buffer.element_size()
        if state.iter < state.start_powerSGD_iter:
            return [buffer.numel() * itemsize]
        uncompressed = ps = qs = 0
        for tensor in bucket.gradients():
            n = tensor.shape[0]
            m = tensor.numel() // n if n else 0
            rank = min(n, m, state.matrix_approximation_rank)
            worth, before, _ = powersgd._should_compress(n, m, rank, state.min_compression_rate)
            if worth:
                ps += n * rank
                qs += m * rank
            else:
                uncompressed += before
        return [uncompressed * itemsize, ps * itemsize, qs * itemsize]

    # ----------------------------------------------------------------------------------------------
    # Per-step accounting and parameters
    # ----------------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self.comm.start_step()

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        module = self.lightning_module
        if module is not None and module._trainer is not None and module._current_fx_name in _LOGGING_HOOKS:
            module.log("comm/bytes_sent", float(self.comm.step_bytes), on_step=True, on_epoch=False)
        return output

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        module = self.lightning_module
        if module is None or module._trainer is None:
            return
        params: dict[str, Any] = {"world_size": self.world_size, "ddp_compression": self.compression}
        if self.compression == "powersgd":
            params.update(powersgd_rank=self.matrix_approximation_rank, powersgd_start_iter=self.start_powersgd_iter)
        for logger in module.trainer.loggers:
            logger.log_hyperparams(params)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, compression in COMPRESSED_DDP_STRATEGY_NAMES.items():
            strategy_registry.register(
                name, cls, description=f"DDP with torch's {compression} gradient compression hook and byte counts",
                override=True, compression=compression,
            )
