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

Checkpoints hold every rank's PowerSGD state (``checkpoint["compressed_ddp_states"]``): the step count, the
generator of ``Q``'s seeds, and the error-feedback and warm-start ``P``/``Q`` memories cut per parameter,
because torch keeps them per gradient bucket and DDP rebuilds its buckets after the first step of every
run (a resumed one included); so a resumed run continues exactly as the uninterrupted one. torch's own
``PowerSGDState.__getstate__`` pickles the per-bucket memories, which a rebuilt layout would scramble.

Why our own: torch's hooks count nothing (``PowerSGDState.compression_stats`` counts elements, not the
messages, and the fp16 hooks count nothing); Lightning passes hooks through but has no byte metric.

References:
    Vogels, Karimireddy & Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression for Distributed
    Optimization", NeurIPS 2019, arXiv:1905.13727.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
from torch.optim import Optimizer
from typing_extensions import override

from lightning_optsurvey import _compat
from lightning_optsurvey.strategies._base import DEFAULT_CPU_TIMEOUT, check_timeout, log_run_params, log_step_metric
from lightning_optsurvey.strategies._comm import CommCounter
from lightning_optsurvey.validation import check_choice, check_float, check_int

__all__ = ["COMPRESSED_DDP_STRATEGY_NAMES", "DDP_COMPRESSIONS", "CompressedDDPStrategy"]

DDP_COMPRESSIONS: tuple[str, ...] = ("none", "fp16", "bf16", "powersgd")
COMPRESSED_DDP_STRATEGY_NAMES: dict[str, str] = {
    "ddp_fp16": "fp16",
    "ddp_bf16": "bf16",
    "ddp_powersgd": "powersgd",
}
"""Registered ``Trainer(strategy=...)`` names and the compression each one uses."""
COMPRESSED_DDP_STATES_KEY = "compressed_ddp_states"
"""Checkpoint key of every rank's byte counts and PowerSGD state (a list indexed by rank)."""
_POWERSGD_MEMORIES = ("error", "p", "q")
_POWERSGD_SETTINGS = frozenset({"matrix_approximation_rank", "start_powerSGD_iter", "min_compression_rate"})


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
        timeout: How long a collective waits for a peer, as a ``timedelta`` or in seconds (default: 5 minutes
            with gloo, Lightning's 30 with NCCL), as for the package's other strategies.
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
        timeout: timedelta | float | None = None,
        **kwargs: Any,
    ) -> None:
        check_choice("compression", compression, DDP_COMPRESSIONS)
        self._timeout_given = check_timeout(timeout)
        hook_keys = sorted({"ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper"} & set(kwargs))
        if hook_keys:
            raise TypeError(
                f"CompressedDDPStrategy sets the DDP communication hook itself; it does not take {hook_keys}"
            )
        check_int("matrix_approximation_rank", matrix_approximation_rank, low=1)
        check_int("start_powersgd_iter", start_powersgd_iter, low=2)
        check_float("min_compression_rate", min_compression_rate, low=1.0)
        if compression != "powersgd":
            for name, value, default in (("matrix_approximation_rank", matrix_approximation_rank, 1),
                                         ("start_powersgd_iter", start_powersgd_iter, 10),
                                         ("min_compression_rate", min_compression_rate, 2.0)):
                if value != default:
                    raise ValueError(f"{name} configures PowerSGD; compression={compression!r} does not use it "
                                     f"(got {value!r})")
        self.compression = compression
        self.matrix_approximation_rank = matrix_approximation_rank
        self.start_powersgd_iter = start_powersgd_iter
        self.min_compression_rate = float(min_compression_rate)
        self.comm = CommCounter()
        self.powersgd_state: powersgd.PowerSGDState | None = None
        self._loaded_powersgd: dict[str, Any] | None = None
        self._bucket_layouts: dict[int, tuple[list[tuple[int, int, int, int]], dict[str, list[int]]]] = {}
        self._param_positions: dict[int, int] | None = None
        self._relayout_pieces: dict[str, dict[int, torch.Tensor]] | None = None
        super().__init__(timeout=self._timeout_given or default_pg_timeout, **kwargs)

    @override
    def setup_distributed(self) -> None:
        if self._timeout_given is None:  # the package's gloo default, as LocalModelStrategy's
            gloo = _compat.process_group_backend(self) == "gloo"
            _compat.set_process_group_timeout(self, DEFAULT_CPU_TIMEOUT if gloo else default_pg_timeout)
        super().setup_distributed()

    @override
    def _register_ddp_hooks(self) -> None:
        # Lightning registers communication hooks on CUDA only (a torch 1.8 restriction); gloo runs them too.
        assert isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        if self.compression == "powersgd":
            scalars = [name for name, p in self.model.module.named_parameters() if p.requires_grad and p.dim() == 0]
            if scalars:  # torch's powerSGD_hook indexes every gradient's first dimension (an IndexError)
                raise ValueError(
                    f"torch's PowerSGD hook cannot compress 0-dimensional parameters, and this model has "
                    f"{scalars}; make them 1-element tensors (e.g. nn.Parameter(torch.zeros(1))), or use "
                    "compression='fp16' or 'bf16'"
                )
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
            if self._loaded_powersgd is not None:
                self._restore_powersgd(self.powersgd_state, self._loaded_powersgd)
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
        layout = self._bucket_layout(bucket)
        orders = self._memory_orders(bucket.parameters(), layout)
        known = self._bucket_layouts.get(bucket.index())
        if known is not None and known[0] != layout:
            # DDP rebuilt its buckets (after the first step of every run, the first after a resume
            # included): carry the memories over, parameter by parameter, into the new layout.
            self._relayout_pieces = self._powersgd_pieces(ps)
            for memory in (ps.error_dict, ps.p_memory_dict, ps.q_memory_dict):
                memory.pop(bucket.index(), None)
        self._bucket_layouts[bucket.index()] = (layout, orders)
        self._assemble_bucket(ps, bucket, layout, orders)
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
    # Checkpoints: every rank's PowerSGD state (error feedback is per rank) and byte counts
    # ----------------------------------------------------------------------------------------------
    def _rank_state(self) -> dict[str, Any]:
        """This rank's state for a checkpoint: byte counts and, under PowerSGD, torch's hook state.

        The hook state is the step count ``iter``, the generator of ``Q``'s seeds and the scalar fields
        ``PowerSGDState`` pickles, and the error-feedback and warm-start ``P``/``Q`` memories cut per
        parameter (keyed by the parameter's position in the module): torch keeps them per gradient
        bucket, and DDP rebuilds its buckets after the first step of every run, so a resumed run's
        buckets need not be laid out as the saved ones were.
        """
        state: dict[str, Any] = {"comm": self.comm.state_dict()}
        ps = self.powersgd_state
        if ps is None:
            if self._loaded_powersgd is not None:  # saved again before the first step of a resumed run
                state["powersgd"] = self._loaded_powersgd
            return state
        skip = ("process_group", "rng", "error_dict", "p_memory_dict", "q_memory_dict")
        hook: dict[str, Any] = {slot: getattr(ps, slot) for slot in ps.__slots__ if slot not in skip}
        kind, keys, pos, has_gauss, gauss = ps.rng.get_state()  # numpy's; stored as plain values
        hook["rng"] = (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss))
        pieces = self._powersgd_pieces(ps)
        if self._loaded_powersgd is not None:  # buckets not seen since the resume keep the loaded pieces
            for key in _POWERSGD_MEMORIES:
                pieces[key] = {**self._loaded_powersgd[key], **pieces[key]}
        hook.update(pieces)
        state["powersgd"] = apply_to_collection(hook, torch.Tensor, lambda t: t.detach().to("cpu", copy=True))
        return state

    def _bucket_layout(self, bucket: dist.GradBucket) -> list[tuple[int, int, int, int]]:
        """``(parameter position, numel, P length, Q length)`` of each gradient in ``bucket``.

        In the order the memories hold them: the error memory follows the bucket, the ``P``/``Q``
        memories group the compressed gradients by shape (first appearance first), as ``powerSGD_hook``
        does; a gradient that is not compressed has lengths 0.
        """
        if self._param_positions is None:
            assert self.lightning_module is not None
            self._param_positions = {id(p): i for i, p in enumerate(self.lightning_module.parameters())}
        ps = self._powersgd_state()
        layout = []
        for param in bucket.parameters():
            n = param.shape[0] if param.dim() else 1
            m = param.numel() // n if n else 0
            rank = min(n, m, ps.matrix_approximation_rank)
            worth = powersgd._should_compress(n, m, rank, ps.min_compression_rate)[0]
            layout.append((self._param_positions[id(param)], param.numel(), n * rank if worth else 0,
                           m * rank if worth else 0))
        return layout

    @staticmethod
    def _memory_orders(bucket_params: list[Any], layout: list[tuple[int, int, int, int]]) -> dict[str, list[int]]:
        """Indices into ``layout`` in the order of each memory (error: the bucket's; P/Q: by shape)."""
        shapes: dict[Any, list[int]] = {}
        for i, (param, entry) in enumerate(zip(bucket_params, layout)):
            if entry[2]:
                shapes.setdefault(tuple(param.shape), []).append(i)
        grouped = [i for group in shapes.values() for i in group]
        return {"error": list(range(len(layout))), "p": grouped, "q": grouped}

    def _powersgd_pieces(self, ps: powersgd.PowerSGDState) -> dict[str, dict[int, torch.Tensor]]:
        """The error and ``P``/``Q`` memories of every bucket seen, cut per parameter."""
        pieces: dict[str, dict[int, torch.Tensor]] = {key: {} for key in _POWERSGD_MEMORIES}
        for b, (layout, orders) in self._bucket_layouts.items():
            memories = {"error": ps.error_dict.get(b), "p": ps.p_memory_dict.get(b), "q": ps.q_memory_dict.get(b)}
            for k, (key, memory) in enumerate(memories.items()):
                if memory is None:
                    continue
                offset = 0
                for i in orders[key]:
                    position, length = layout[i][0], layout[i][1 + k]
                    pieces[key][position] = memory[offset : offset + length]
                    offset += length
        return pieces

    def _assemble_bucket(self, ps: powersgd.PowerSGDState, bucket: dist.GradBucket,
                         layout: list[tuple[int, int, int, int]], orders: dict[str, list[int]]) -> None:
        """Give a resumed run's ``bucket`` its saved error and ``P``/``Q`` memories in this run's layout."""
        saved = self._relayout_pieces or self._loaded_powersgd
        b = bucket.index()
        if saved is None or b in ps.error_dict:
            return
        buffer = bucket.buffer()
        targets = {"error": ps.error_dict, "p": ps.p_memory_dict, "q": ps.q_memory_dict}
        for key, target in targets.items():
            needed = [layout[i][0] for i in orders[key]]
            if needed and all(position in saved[key] for position in needed):
                target[b] = torch.cat([saved[key][position].flatten() for position in needed]).to(buffer)

    def _restore_powersgd(self, ps: powersgd.PowerSGDState, saved: dict[str, Any]) -> None:
        for slot, value in saved.items():
            if slot in _POWERSGD_SETTINGS or slot in _POWERSGD_MEMORIES:  # settings: the constructor's win
                continue
            if slot == "rng":
                kind, keys, pos, has_gauss, gauss = value
                ps.rng.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
                continue
            setattr(ps, slot, value)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        gathered: list[Any] | None = [self._rank_state()]
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            gathered = [None] * self.world_size if self.is_global_zero else None
            dist.gather_object(self._rank_state(), gathered, dst=0)
        if self.is_global_zero:
            checkpoint[COMPRESSED_DDP_STATES_KEY] = {"compression": self.compression, "world_size": self.world_size,
                                                     "ranks": gathered}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        super().load_model_state_dict(checkpoint, strict=strict)
        saved = checkpoint.get(COMPRESSED_DDP_STATES_KEY)
        if saved is None:
            return
        if saved["world_size"] != self.world_size or saved["compression"] != self.compression:
            rank_zero_warn(
                f"The checkpoint holds {saved['compression']} DDP states of {saved['world_size']} ranks; this run "
                f"is {self.compression} on {self.world_size}, so compression state (error feedback) starts afresh."
            )
            return
        own = saved["ranks"][self.global_rank]
        self.comm.load_state_dict(own["comm"])
        if "powersgd" in own:
            self.powersgd_state = None
            self._bucket_layouts = {}
            self._relayout_pieces = None
            self._loaded_powersgd = own["powersgd"]

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
        log_step_metric(self.lightning_module, "comm/bytes_sent", float(self.comm.step_bytes))
        return output

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        params: dict[str, Any] = {"world_size": self.world_size, "ddp_compression": self.compression}
        if self.compression == "powersgd":
            params.update(powersgd_rank=self.matrix_approximation_rank, powersgd_start_iter=self.start_powersgd_iter)
        log_run_params(self.lightning_module, params)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, compression in COMPRESSED_DDP_STRATEGY_NAMES.items():
            strategy_registry.register(
                name, cls, description=f"DDP with torch's {compression} gradient compression hook and byte counts",
                override=True, compression=compression,
            )
