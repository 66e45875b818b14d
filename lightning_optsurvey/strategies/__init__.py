"""Distributed training strategies: decentralized gossip and centralized data-parallel methods.

Importing this package registers every strategy name in Lightning's ``StrategyRegistry``
(``"gossip"``, ``"gossip_ring"``, ...). Registration overrides earlier entries of the same names, so
importing or reloading twice is harmless.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_optsurvey.strategies._base import LocalModelStrategy
from lightning_optsurvey.strategies._comm import CommCounter, FlatBuffers, consensus_distance
from lightning_optsurvey.strategies.gossip import GOSSIP_STRATEGY_NAMES, GossipStrategy
from lightning_optsurvey.strategies.topology import TOPOLOGY_KINDS, Topology

GossipStrategy.register_strategies(StrategyRegistry)

__all__ = [
    "GOSSIP_STRATEGY_NAMES",
    "TOPOLOGY_KINDS",
    "CommCounter",
    "FlatBuffers",
    "GossipStrategy",
    "LocalModelStrategy",
    "Topology",
    "consensus_distance",
]
