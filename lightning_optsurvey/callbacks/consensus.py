r"""ConsensusDistance: how far the ranks' models are from their average.

.. math::

    \Xi^2 = \frac1N \sum_{i=1}^N \lVert x_i - \bar x\rVert^2, \qquad \bar x = \frac1N \sum_i x_i,

over the trainable parameters, computed with two all-reduces (the average, then the squared
deviations) by :func:`lightning_optsurvey.strategies.consensus_distance`. It is the quantity that
decentralized SGD theory bounds (it shrinks by at most :math:`|\lambda_2(W)|^2` per pure gossip round)
and that Kong et al. propose to control. Under DDP it is 0 up to rounding; under gossip or local SGD it
measures the drift between averaging rounds. Logged as ``gossip/consensus_distance``.

Why our own: no library computes it for a Lightning run; it is a few lines over the flat-buffer
all-reduce that the strategies already use.

References:
    Kong et al., "Consensus Control for Decentralized Deep Learning", ICML 2021, arXiv:2102.04828.
    Koloskova et al., "A Unified Theory of Decentralized SGD with Changing Topology and Local
    Updates", ICML 2020, arXiv:2003.10422.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from lightning_optsurvey.callbacks._measure import MeasuringCallback
from lightning_optsurvey.strategies import consensus_distance

__all__ = ["ConsensusDistance"]


class ConsensusDistance(MeasuringCallback):
    r"""Log the consensus distance :math:`\Xi^2` of the parameters as ``gossip/consensus_distance``.

    A collective measurement: every rank must run it (the cadence is the same on all ranks). It reads
    the parameters and changes nothing.

    Args:
        every_n_steps: Measure after every n-th optimizer step (``None``: never at steps).
        every_n_epochs: Measure at the end of every n-th epoch (``None``: never at epoch ends).

    Raises:
        ValueError: If a cadence is not a positive integer or ``None``, or both are ``None``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(strategy="gossip_ring", callbacks=[ConsensusDistance(every_n_steps=10)])  # doctest: +SKIP
    """

    def __init__(self, every_n_steps: int | None = 10, every_n_epochs: int | None = None) -> None:
        super().__init__(every_n_epochs=every_n_epochs, every_n_steps=every_n_steps)

    @override
    def measurement_batches(self, trainer: Trainer, pl_module: LightningModule) -> list[Any]:
        return []  # a property of the parameters, no data needed

    @override
    def measure(self, trainer: Trainer, pl_module: LightningModule, batches: list[Any]) -> dict[str, float]:
        params = [p for p in pl_module.parameters() if p.requires_grad]
        return {"gossip/consensus_distance": float(consensus_distance(params))}
