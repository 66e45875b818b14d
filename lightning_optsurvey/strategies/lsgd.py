r"""Leader SGD and GRAWA: ``Trainer(strategy="lsgd")``, ``Trainer(strategy="grawa")``.

Each rank trains its own model; every ``sync_every`` (:math:`\tau`) optimizer steps the workers are
pulled toward a point chosen from all of them, with pull strength :math:`\lambda`:

- ``leader="loss"`` (LSGD, Teng et al. 2019): the leader :math:`\ell` is the rank with the lowest
  average training loss since the previous synchronization (one all-gather of a scalar per rank); its
  parameters are broadcast and every other rank moves toward them,

  .. math:: x_i \leftarrow x_i - \lambda (x_i - x_\ell), \qquad i \ne \ell,

  while the leader keeps its own model;
- ``leader="grawa"`` (GRAWA, Dimlioglu & Choromanska 2024, the model-level variant): the center is the
  average of the workers weighted by the inverse norms of their gradients, so workers in flatter
  regions count more, and every worker is pulled toward it,

  .. math::

      c = \sum_i w_i x_i, \quad w_i = \frac{1/\lVert\nabla f_i(x_i)\rVert}{\sum_j 1/\lVert\nabla f_j(x_j)\rVert},
      \qquad x_i \leftarrow x_i - \lambda (x_i - c),

  with one all-gather of the gradient norms and one all-reduce of :math:`w_i x_i`. The gradient is the
  one this rank's optimizer used in the synchronization step (after unscaling and clipping).

Uneven data (ranks with different numbers of batches in an epoch): a rank that has run out of batches
keeps taking part in the synchronizations until every rank has finished the epoch. It can be the
leader only with losses of steps not yet synchronized (otherwise its mean loss is :math:`+\infty`), it
has weight 0 in GRAWA's center unless it has such steps, and it is pulled like every other rank.

Float buffers are pulled like parameters. The pure functions :func:`select_leader`,
:func:`leader_pull`, :func:`grawa_weights` and :func:`grawa_center` hold the maths; the strategy runs
them across ranks. Checkpoints hold the average model plus each rank's own state (model, optimizer,
the running loss since the last synchronization) for an exact resume.

Why our own: neither method has a PyTorch Lightning or ``torch.distributed`` implementation; the
authors' code is research code with its own process management.

References:
    Teng, Gao, Karmarkar, Deng, Park, Ma, Wang, Choromanska & LeCun, "Leader Stochastic Gradient
    Descent for Distributed Training of Deep Learning Models", NeurIPS 2019, arXiv:1905.10395.
    Dimlioglu & Choromanska, "GRAWA: Gradient-based Weighted Averaging for Distributed Training of
    Deep Learning Models", AISTATS 2024, arXiv:2403.04206.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_optsurvey.strategies._base import PeriodicSyncStrategy
from lightning_optsurvey.strategies._comm import broadcast_flat, is_distributed, world_size
from lightning_optsurvey.validation import check_choice, check_probability

__all__ = [
    "LEADER_RULES",
    "LSGDStrategy",
    "grawa_center",
    "grawa_weights",
    "leader_pull",
    "select_leader",
]

LEADER_RULES: tuple[str, ...] = ("loss", "grawa")
"""How the point the workers are pulled toward is chosen: the lowest-loss worker, or GRAWA's center."""


# --------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------
def select_leader(losses: Tensor) -> int:
    r"""The index of the lowest loss; ties go to the lowest index, NaN counts as :math:`+\infty`.

    Args:
        losses: One loss per worker, shape ``(N,)``.

    Returns:
        The leader's index (0 if every loss is NaN or infinite).

    Raises:
        ValueError: If ``losses`` is not a non-empty vector.
    """
    if losses.dim() != 1 or losses.numel() == 0:
        raise ValueError(f"losses must be a non-empty vector, got shape {tuple(losses.shape)}")
    values = losses.detach().to(torch.float64)
    cleaned = torch.where(torch.isnan(values), torch.full_like(values, math.inf), values)
    best = cleaned.min()
    return int(torch.nonzero(cleaned == best)[0, 0])


def leader_pull(x: Tensor, leader: Tensor, strength: float) -> Tensor:
    r"""LSGD's pull toward the leader: :math:`x - \lambda (x - x_\ell)` (a new tensor).

    Args:
        x: A worker's parameters.
        leader: The leader's (or center's) parameters, same shape.
        strength: :math:`\lambda`.

    Returns:
        The pulled parameters.
    """
    return x - strength * (x - leader)


def grawa_weights(grad_norms: Tensor) -> Tensor:
    r"""GRAWA's averaging weights :math:`w_i = \lVert g_i\rVert^{-1} / \sum_j \lVert g_j\rVert^{-1}`.

    Limits are taken where the formula breaks down: workers with a zero gradient norm share all the
    weight equally (their inverse norm is infinite), and non-finite norms get weight 0; if no norm is
    finite the weights are uniform.

    Args:
        grad_norms: Non-negative gradient norms, shape ``(N,)``.

    Returns:
        Weights in float64 that sum to 1, shape ``(N,)``.

    Raises:
        ValueError: If ``grad_norms`` is not a non-empty vector or has a negative entry.

    References:
        Dimlioglu & Choromanska, "GRAWA: Gradient-based Weighted Averaging for Distributed Training
        of Deep Learning Models", AISTATS 2024, arXiv:2403.04206.
    """
    if grad_norms.dim() != 1 or grad_norms.numel() == 0:
        raise ValueError(f"grad_norms must be a non-empty vector, got shape {tuple(grad_norms.shape)}")
    norms = grad_norms.detach().to(torch.float64)
    if bool((norms < 0).any()):
        raise ValueError(f"gradient norms must be non-negative, got {norms.tolist()}")
    finite = torch.isfinite(norms)
    if not bool(finite.any()):
        return torch.full_like(norms, 1.0 / norms.numel())
    zero = finite & (norms == 0)
    if bool(zero.any()):
        return zero.to(torch.float64) / zero.sum()
    inverse = torch.where(finite, 1.0 / norms, torch.zeros_like(norms))
    return inverse / inverse.sum()


def grawa_center(workers: Sequence[Tensor], grad_norms: Tensor) -> Tensor:
    r"""GRAWA's center :math:`c = \sum_i w_i x_i` with :func:`grawa_weights`.

    Args:
        workers: The workers' parameters :math:`x_i` (same shape).
        grad_norms: Their gradient norms, shape ``(N,)``.

    Returns:
        The weighted average, in the workers' dtype.

    Raises:
        ValueError: If the numbers of workers and norms differ.
    """
    if len(workers) != grad_norms.numel():
        raise ValueError(f"got {grad_norms.numel()} gradient norms for {len(workers)} workers")
    weights = grawa_weights(grad_norms)
    stacked = torch.stack([x.detach() for x in workers]).to(torch.float64)
    shape = (-1,) + (1,) * (stacked.dim() - 1)
    return (weights.view(shape) * stacked).sum(0).to(workers[0].dtype)


# --------------------------------------------------------------------------------------------------
# The strategy
# --------------------------------------------------------------------------------------------------
class LSGDStrategy(PeriodicSyncStrategy):
    r"""Leader SGD (``leader="loss"``) or GRAWA (``leader="grawa"``): pull the workers every few steps.

    Args:
        pull_strength: :math:`\lambda \in (0, 1]`, the fraction of the distance to the leader (or
            GRAWA's center) a worker moves at each synchronization (1: jump onto it).
        sync_every: :math:`\tau`, the number of optimizer steps between synchronizations.
        leader: ``"loss"`` (the rank with the lowest average training loss since the previous
            synchronization; the loss is what ``training_step`` returns, or its ``"loss"`` entry) or
            ``"grawa"`` (the inverse-gradient-norm weighted average of all ranks).
        **ddp_kwargs: ``accelerator``, ``parallel_devices``, ``cluster_environment``,
            ``checkpoint_io``, ``precision_plugin``, ``process_group_backend``, ``timeout``,
            ``start_method`` (see :class:`~lightning.pytorch.strategies.DDPStrategy`).

    Raises:
        ValueError: If ``pull_strength`` is not in (0, 1], ``sync_every < 1``, or ``leader`` is not one
            of :data:`LEADER_RULES`; for ``Trainer(sync_batchnorm=True)``.
        TypeError: For arguments of the wrong type, or ``DistributedDataParallel`` keywords.

    Logs ``lsgd/leader`` (the leader's rank) at every synchronization with ``leader="loss"``.

    Example:
        >>> import lightning_optsurvey  # registers "lsgd" and "grawa"
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(accelerator="cpu", devices=4, strategy="lsgd")  # doctest: +SKIP
        >>> trainer = Trainer(devices=4, strategy=LSGDStrategy(0.2, sync_every=8, leader="grawa"))  # doctest: +SKIP

    References:
        Teng et al., "Leader Stochastic Gradient Descent for Distributed Training of Deep Learning
        Models", NeurIPS 2019, arXiv:1905.10395.
        Dimlioglu & Choromanska, "GRAWA: Gradient-based Weighted Averaging for Distributed Training
        of Deep Learning Models", AISTATS 2024, arXiv:2403.04206.
    """

    strategy_name = "lsgd"
    registry_entries = {
        strategy_name: ("Leader SGD: workers pulled toward the lowest-loss rank every sync_every steps", {}),
        "grawa": ("GRAWA: workers pulled toward the inverse-gradient-norm weighted average", {"leader": "grawa"}),
    }

    def __init__(
        self, pull_strength: float = 0.1, sync_every: int = 4, leader: str = "loss", **ddp_kwargs: Any
    ) -> None:
        pull_strength = check_probability("pull_strength", pull_strength, low_open=True)
        self.leader = check_choice("leader", leader, LEADER_RULES)
        super().__init__(sync_every=sync_every, **ddp_kwargs)
        self.pull_strength = pull_strength
        self._loss_sum: Tensor | None = None
        self._loss_count = 0
        self._last_leader: int | None = None

    @property
    def last_leader(self) -> int | None:
        """The leader's rank at the latest synchronization (``leader="loss"``), ``None`` before one."""
        return self._last_leader

    # ----------------------------------------------------------------------------------------------
    # Setup and loss bookkeeping
    # ----------------------------------------------------------------------------------------------
    @override
    def _on_fit_setup(self) -> None:
        super()._on_fit_setup()
        if self._loss_sum is None:
            self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.root_device)
        else:
            self._loss_sum = self._loss_sum.to(self.root_device)

    @override
    def _record_batch_loss(self, loss: Tensor) -> None:
        if self.leader == "loss" and self._loss_sum is not None:
            self._loss_sum += loss.to(self._loss_sum.device, torch.float64).reshape(())
            self._loss_count += 1

    # ----------------------------------------------------------------------------------------------
    # Synchronization
    # ----------------------------------------------------------------------------------------------
    def _all_gather_scalar(self, value: Tensor) -> Tensor:
        size = world_size()
        gathered = [torch.empty_like(value) for _ in range(size)]
        dist.all_gather(gathered, value)
        self.comm.add_send(value.numel() * value.element_size() * (size - 1), messages=size - 1)
        return torch.stack(gathered)

    @override
    def _synchronize(self, optimizer: Optimizer) -> None:
        if not is_distributed():
            self._reset_loss()
            return
        if self.leader == "loss":
            self._pull_to_leader()
        else:
            self._pull_to_grawa_center(optimizer)

    def _reset_loss(self) -> None:
        if self._loss_sum is not None:
            self._loss_sum.zero_()
        self._loss_count = 0

    def _pull_to_leader(self) -> None:
        assert self._flat is not None and self._loss_sum is not None
        mean = (
            self._loss_sum / self._loss_count if self._loss_count
            else torch.full((), math.inf, dtype=torch.float64, device=self._loss_sum.device)
        )
        leader = select_leader(self._all_gather_scalar(mean.reshape(1)).reshape(-1))
        self._reset_loss()
        self._last_leader = leader
        leader_model = broadcast_flat(self._flat, leader, counter=self.comm)
        if self.global_rank != leader:
            self._pull_toward_(leader_model, self.pull_strength)
        self._log_metric("lsgd/leader", float(leader))

    def _grad_norm(self, optimizer: Optimizer) -> Tensor:
        grads = [p.grad.detach() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        device = self.root_device
        if not grads:
            return torch.zeros(1, dtype=torch.float64, device=device)
        norms = torch._foreach_norm(grads)
        return torch.stack([n.to(device, torch.float64) for n in norms]).square().sum().sqrt().reshape(1)

    def _pull_to_grawa_center(self, optimizer: Optimizer) -> None:
        assert self._flat is not None
        contrib = self._contrib
        if contrib is None or contrib[self.global_rank]:
            norm = self._grad_norm(optimizer)
        else:  # out of data with nothing new: weight 0 in the center (an infinite gradient norm)
            norm = torch.full((1,), math.inf, dtype=torch.float64, device=self.root_device)
        weights = grawa_weights(self._all_gather_scalar(norm).reshape(-1))
        own = float(weights[self.global_rank])
        center = self._flat.pack()
        for buffer in center:
            buffer.mul_(own)
            dist.all_reduce(buffer)
        self.comm.add_all_reduce(self._flat.nbytes, world_size())
        self._pull_toward_(center, self.pull_strength)

    # ----------------------------------------------------------------------------------------------
    # Logging and checkpoints
    # ----------------------------------------------------------------------------------------------
    @override
    def _logged_params(self) -> dict[str, Any]:
        params = super()._logged_params()
        params.update(lsgd_pull_strength=self.pull_strength, lsgd_leader=self.leader)
        return params

    @override
    def _rank_state(self) -> dict[str, Any]:
        state = super()._rank_state()
        if self._loss_sum is not None:
            state.update(loss_sum=self._loss_sum.detach().clone(), loss_count=self._loss_count)
        return state

    @override
    def _load_rank_state(self, state: Mapping[str, Any]) -> None:
        super()._load_rank_state(state)
        loss_sum = state.get("loss_sum")
        self._loss_sum = None if loss_sum is None else loss_sum.detach().to(torch.float64).reshape(()).clone()
        self._loss_count = int(state.get("loss_count", 0))
