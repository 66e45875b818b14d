r"""Elastic averaging SGD (synchronous EASGD): ``Trainer(strategy="easgd")``.

Each rank trains its own model :math:`x_i`, tied by an elastic force to a center variable
:math:`\tilde x` that every rank holds a copy of. Every ``sync_every`` (:math:`\tau`) steps, with
:math:`\alpha = \eta\rho` (learning rate times the elastic coefficient) or a given moving rate,

.. math::

    x_i &\leftarrow x_i - \eta\, g_i(x_i) - \alpha\,(x_i - \tilde x), \\
    \tilde x &\leftarrow \tilde x + \alpha \sum_{i=1}^N (x_i - \tilde x),

both differences taken at the parameters *before* the optimizer step, as in the paper's synchronous
update. By default :math:`\alpha = 0.9 / N` (:math:`\beta = N\alpha = 0.9`, the paper's Sec. 5
recommendation) (the optimizer supplies the :math:`-\eta g_i` part; other steps are purely local). The sum is
one all-reduce of the differences per dtype and device, started before the forward pass of the
synchronization step so that it overlaps the gradient computation. The center is identical on every
rank, so no parameter server is needed. Float buffers (BatchNorm statistics) are coupled the same way.

On a quadratic :math:`f(x) = \frac h2 x^2` the recursion is linear with iteration matrix
:func:`easgd_quadratic_matrix`; it is stable (Zhang, Choromanska & LeCun 2015, synchronous analysis)
iff the worker deviations contract, :math:`|1 - \alpha - \eta h| < 1`, and the 2x2 map of the
workers' mean and the center, :math:`\begin{pmatrix}1-\alpha-\eta h & \alpha\\ \beta & 1-\beta
\end{pmatrix}` with :math:`\beta = N\alpha`, has spectral radius below one, which by the Jury criterion
is :math:`\beta\eta h > 0`, :math:`4 - 2\alpha - 2\beta - 2\eta h + \beta\eta h > 0` and
:math:`|(1-\beta)(1-\eta h) - \alpha| < 1` (:func:`easgd_is_stable`). The elastic coupling can make
the method diverge where plain SGD (:math:`0 < \eta h < 2`) converges: at :math:`\eta h \to 0` the
center's eigenvalue is :math:`1 - (N+1)\alpha`, so :math:`(N+1)\alpha \ge 2` always diverges.

The pure functions (:func:`easgd_step`, :func:`easgd_quadratic_matrix`, :func:`easgd_is_stable`,
:func:`easgd_fixed_point`) know nothing of Lightning or processes: they live in
:mod:`lightning_optsurvey.averaging.elastic` (re-exported here); the strategy runs the same update per
rank, and the theory checks use them without Lightning.

Checkpoints hold the center model (``checkpoint["state_dict"]`` is :math:`\tilde x`), plus every rank's
own model and optimizer state for an exact resume.

Why our own: EASGD has no maintained implementation for PyTorch Lightning or ``torch.distributed``;
the authors' code is Lua Torch with a parameter server.

References:
    Zhang, Choromanska & LeCun, "Deep learning with Elastic Averaging SGD", NeurIPS 2015,
    arXiv:1412.6651.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_optsurvey.averaging.elastic import (
    easgd_fixed_point,
    easgd_is_stable,
    easgd_quadratic_matrix,
    easgd_step,
)
from lightning_optsurvey.strategies._base import PeriodicSyncStrategy
from lightning_optsurvey.strategies._comm import is_distributed, world_size
from lightning_optsurvey.validation import check_bool, check_float, check_optional, check_probability

__all__ = [
    "DEFAULT_BETA",
    "EASGDStrategy",
    "easgd_fixed_point",
    "easgd_is_stable",
    "easgd_quadratic_matrix",
    "easgd_step",
]


DEFAULT_BETA = 0.9
"""The default :math:`\beta = N\alpha` (Zhang, Choromanska & LeCun 2015, Sec. 5: "beta = p alpha = 0.9")."""


# --------------------------------------------------------------------------------------------------
# The strategy
# --------------------------------------------------------------------------------------------------
def _asynchronous_easgd(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``EASGDStrategy(..., asynchronous=True)``: the asynchronous strategy with the same arguments."""
    from lightning_optsurvey.strategies.easgd_async import AsyncEASGDStrategy

    if "beta" in kwargs:
        raise TypeError(
            "beta (the synchronous default rule alpha = beta / N) is not an argument of asynchronous "
            "EASGD; pass rho or moving_rate"
        )
    options = dict(kwargs)
    options.update(zip(("rho", "sync_every", "moving_rate"), args))
    if options.get("rho", 0.1) is None:
        options.pop("rho")
    return AsyncEASGDStrategy(**options)


class _EASGDMeta(type(PeriodicSyncStrategy)):  # type: ignore[misc]
    """Builds :class:`AsyncEASGDStrategy` for ``EASGDStrategy(..., asynchronous=True)``.

    That is the published, barrier-free method (registered as "easgd_async", center on rank 0); the synchronous
    default is the class itself. A metaclass rather than ``__new__``, so that LightningCLI reads the parameters
    from ``__init__``.
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is EASGDStrategy and check_bool("asynchronous", kwargs.get("asynchronous", False)):
            return _asynchronous_easgd(args, {k: v for k, v in kwargs.items() if k != "asynchronous"})
        return super().__call__(*args, **kwargs)


class EASGDStrategy(PeriodicSyncStrategy, metaclass=_EASGDMeta):
    r"""Synchronous elastic averaging SGD with the center variable replicated on every rank.

    Every ``sync_every`` steps each rank takes its optimizer step and the elastic step of
    :func:`easgd_step`: :math:`x_i \leftarrow x_i - \alpha(x_i - \tilde x)` and
    :math:`\tilde x \leftarrow \tilde x + \sum_i \alpha_i (x_i - \tilde x)`, the differences taken
    before the optimizer step (each rank weights its own difference by its own :math:`\alpha_i`, so the
    replicated center stays identical). The moving rate :math:`\alpha`, in order of precedence:

    - ``moving_rate``: fixed;
    - ``rho``: :math:`\alpha = \eta\rho` with the learning rate of each parameter's group at that step
      (learning-rate schedules apply; float buffers use the first group's);
    - default: :math:`\alpha = \beta / N` with :math:`\beta = 0.9`, the paper's recommendation
      (Zhang, Choromanska & LeCun 2015, Sec. 5: choose :math:`\beta = p\alpha` around 0.9, p = N
      workers), so the center moves 90% of the way to the workers' mean at each elastic update and
      tracks them closely. (A small ``rho`` such as 0.1 with lr 0.05 gives :math:`\alpha` = 0.005, and
      the center lags far behind the workers in short runs.)

    On a single process it runs EASGD with one worker. Ranks that have run out of data in an epoch
    (uneven loaders) take part in elastic updates with a zero difference and keep their worker model:
    the center moves by :math:`\sum_{i\ \text{active}} \alpha_i (x_i - \tilde x)`.

    Args:
        rho: The elastic coefficient :math:`\rho > 0` (:math:`\alpha = \eta\rho`); ``None``: the
            :math:`\beta / N` rule.
        sync_every: :math:`\tau`, the number of optimizer steps between elastic updates.
        moving_rate: A fixed :math:`\alpha` in (0, 1) instead of :math:`\eta\rho` or :math:`\beta/N`.
        beta: :math:`\beta = N\alpha` in (0, 1) for the default rule.
        asynchronous: ``True`` builds asynchronous EASGD instead
            (:class:`~lightning_optsurvey.strategies.easgd_async.AsyncEASGDStrategy`, registered as
            ``"easgd_async"``: the center on rank 0, each worker exchanging every ``sync_every`` of its own
            steps without a barrier); ``rho`` then defaults to that class's 0.1 and ``beta`` is refused.
        **ddp_kwargs: ``accelerator``, ``parallel_devices``, ``cluster_environment``,
            ``checkpoint_io``, ``precision_plugin``, ``process_group_backend``, ``timeout``,
            ``start_method`` (see :class:`~lightning.pytorch.strategies.DDPStrategy`).

    Raises:
        ValueError: If ``rho`` is not a positive finite number, ``sync_every < 1``, ``moving_rate`` or
            ``beta`` is not in (0, 1), or :math:`(N+1)\alpha \ge 2` (the center's update then diverges for any
            learning rate; checked in ``Trainer.__init__`` for ``moving_rate``, at fit start for
            :math:`\eta\rho`); for ``Trainer(sync_batchnorm=True)``.
        TypeError: For arguments of the wrong type, or ``DistributedDataParallel`` keywords.

    Example:
        >>> import lightning_optsurvey  # registers "easgd"
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(accelerator="cpu", devices=4, strategy="easgd")  # doctest: +SKIP
        >>> trainer = Trainer(devices=4, strategy=EASGDStrategy(rho=0.5, sync_every=8))  # doctest: +SKIP

    References:
        Zhang, Choromanska & LeCun, "Deep learning with Elastic Averaging SGD", NeurIPS 2015,
        arXiv:1412.6651.
    """

    strategy_name = "easgd"
    registry_entries = {
        strategy_name: ("Synchronous elastic averaging SGD (EASGD) with the center replicated on every rank", {}),
    }

    def __init__(
        self,
        rho: float | None = None,
        sync_every: int = 4,
        moving_rate: float | None = None,
        *,
        beta: float = DEFAULT_BETA,
        asynchronous: bool = False,
        **ddp_kwargs: Any,
    ) -> None:
        rho = check_optional(check_float, "rho", rho, low=0.0, low_open=True)
        moving_rate = check_optional(check_probability, "moving_rate", moving_rate, low_open=True, high_open=True)
        beta = check_probability("beta", beta, low_open=True, high_open=True)
        super().__init__(sync_every=sync_every, **ddp_kwargs)
        self.rho, self.moving_rate, self.beta = rho, moving_rate, beta
        self._center: list[Tensor] | None = None
        self._center_source: Mapping[str, Any] | None = None
        self._tensors: list[Tensor] = []
        self._keys: list[str | None] = []
        self._groups: list[dict[str, Any]] = []
        self._diff_views: list[Tensor] = []
        self._sum_views: list[Tensor] = []
        self._center_views: list[Tensor] = []
        self._diff: list[Tensor] = []
        self._sum: list[Tensor] = []
        self._works: list[Any] = []
        self._alpha_now: list[float] = []
        self._contributes = True
        self._launched = False

    # ----------------------------------------------------------------------------------------------
    # Configuration
    # ----------------------------------------------------------------------------------------------
    @override
    def _validate_world_size(self, world_size: int) -> None:
        if self.moving_rate is not None:
            self._check_alpha(self.moving_rate, world_size)

    @staticmethod
    def _check_alpha(alpha: float, world_size: int) -> None:
        if (world_size + 1) * alpha >= 2:
            raise ValueError(
                f"EASGD with moving rate alpha={alpha:g} on {world_size} ranks diverges: the center's update "
                f"has eigenvalue 1 - (N + 1) alpha = {1 - (world_size + 1) * alpha:g} <= -1 for any learning "
                f"rate. Use alpha < {2 / (world_size + 1):g} (a smaller rho, learning rate or moving_rate)."
            )

    @property
    def center(self) -> list[Tensor] | None:
        """The center variable as flat buffers (one per dtype and device), ``None`` before fitting."""
        return self._center

    def center_tensors(self) -> dict[str, Tensor]:
        """The center variable by state-dict key (parameters and float buffers); empty before fitting.

        The tensors are views into the center's flat buffers: clone them to keep a snapshot, and do not
        modify them.
        """
        return {k: v for k, v in zip(self._keys, self._center_views) if k is not None}

    @property
    def alpha_rule(self) -> str:
        """How the moving rate is chosen: ``"moving_rate"``, ``"rho*lr"`` or ``"beta/N"`` (the default)."""
        if self.moving_rate is not None:
            return "moving_rate"
        return "rho*lr" if self.rho is not None else "beta/N"

    def _alphas(self) -> list[float]:
        if self.moving_rate is not None:
            return [self.moving_rate] * len(self._tensors)
        if self.rho is None:
            return [self.beta / self.world_size] * len(self._tensors)
        return [self.rho * float(group["lr"]) for group in self._groups]

    # ----------------------------------------------------------------------------------------------
    # Setup
    # ----------------------------------------------------------------------------------------------
    @override
    def _on_fit_setup(self) -> None:
        previous = self.center_tensors() if self._center is not None else {}
        super()._on_fit_setup()
        self._works = []
        flat = self._flat
        if flat is None:
            self._center = None
            return
        self._tensors, self._keys, self._groups = self._flat_layout(flat)
        self._center, self._diff, self._sum = flat.like(), flat.like(), flat.like()
        self._center_views = flat.all_views(self._center)
        self._diff_views, self._sum_views = flat.all_views(self._diff), flat.all_views(self._sum)
        source = self._center_source if self._center_source is not None else previous
        self._center_source = None
        with torch.no_grad():
            for key, center, tensor in zip(self._keys, self._center_views, self._tensors):
                value = source.get(key) if key is not None else None
                if isinstance(value, Tensor) and value.shape == center.shape:
                    center.copy_(value)
                else:
                    center.copy_(tensor.detach())
        self._check_alpha(max(self._alphas()), self.world_size)

    # ----------------------------------------------------------------------------------------------
    # The elastic step
    # ----------------------------------------------------------------------------------------------
    @override
    def _pre_optimizer_step(self, optimizer: Optimizer) -> None:
        if not self._sync_due() or self._flat is None:
            return
        # The reduction overlaps the forward and backward passes, unless a rank is out of data (then the
        # round is announced after the step and the reduction starts in _synchronize).
        self._start_elastic_sum(contributes=True, launch=not self._live)

    def _start_elastic_sum(self, contributes: bool, launch: bool = True) -> None:
        r"""Start the all-reduce of :math:`\alpha (x_i - \tilde x)` (zeros for a rank out of data)."""
        assert self._center is not None and self._flat is not None
        self._alpha_now = self._alphas()
        with torch.no_grad():
            for diff, current, center in zip(self._diff, self._flat.pack(), self._center):
                torch.sub(current, center, out=diff)
            # Each rank weights its own difference, so the center's update is identical on every rank
            # even if their learning rates (and so alphas) differ.
            for total in self._sum:
                total.zero_()
            if contributes:
                torch._foreach_add_(self._sum_views, torch._foreach_mul(self._diff_views, self._alpha_now))
        self._contributes = contributes
        self._launched = False
        if launch:
            self._launch_elastic_sum()

    def _launch_elastic_sum(self) -> None:
        assert self._flat is not None
        self._launched = True
        if is_distributed():
            self._works = [dist.all_reduce(total, async_op=True) for total in self._sum]
            self.comm.add_all_reduce(self._flat.nbytes, world_size())

    @override
    def _shadow_synchronize(self, optimizer: Optimizer | None) -> None:
        # Out of data: contribute this rank's last steps if they were not yet sent, else a zero difference
        # (the worker stays where it is); the replicated center takes the same update as everywhere.
        contrib = self._contrib
        self._start_elastic_sum(contributes=contrib is None or bool(contrib[self.global_rank]))
        self._synchronize(optimizer)  # type: ignore[arg-type]

    @override
    def _synchronize(self, optimizer: Optimizer) -> None:
        if not self._launched:
            self._launch_elastic_sum()
        if self._contributes:
            torch._foreach_sub_(self._tensors, torch._foreach_mul(self._diff_views, self._alpha_now))
        for work in self._works:
            work.wait()
        self._works = []
        torch._foreach_add_(self._center_views, self._sum_views)

    # ----------------------------------------------------------------------------------------------
    # Logging and checkpoints
    # ----------------------------------------------------------------------------------------------
    @override
    def _logged_params(self) -> dict[str, Any]:
        params = super()._logged_params()
        params.update(easgd_rho=self.rho, easgd_moving_rate=self.moving_rate, easgd_beta=self.beta,
                      easgd_alpha_rule=self.alpha_rule)
        return params

    @override
    def checkpoint_model_state(self) -> dict[str, Any]:
        """The center model: the module's state with every synchronized tensor replaced by the center.

        What checkpoints hold and what validation, test and predict evaluate on every rank. Falls back to
        the consensus average before the first fit. Not a collective call once the center exists (it is
        the same on every rank).
        """
        if self._center is None:
            return super().checkpoint_model_state()
        state = self._state_copy()
        for key, center in self.center_tensors().items():
            state[key] = center.detach().clone()
        return state

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        super().load_model_state_dict(checkpoint, strict=strict)
        # The checkpoint's model is the center (or, from another strategy, the consensus, which is
        # also what the ranks start from), so the center is restored from it at fit setup.
        self._center_source = checkpoint.get("state_dict")
