"""Distributed training strategies: decentralized gossip and centralized data-parallel methods.

Importing this package registers every strategy name in Lightning's ``StrategyRegistry``
(``"gossip"``, ``"gossip_ring"``, ...). Registration overrides earlier entries of the same names, so
importing or reloading twice is harmless.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_optsurvey.averaging.compression import QSGD, Compressor, RandomK, Sign, TopK
from lightning_optsurvey.strategies._base import LocalModelStrategy, PeriodicSyncStrategy
from lightning_optsurvey.strategies._comm import CommCounter, FlatBuffers, consensus_distance
from lightning_optsurvey.strategies.compressed_ddp import COMPRESSED_DDP_STRATEGY_NAMES, CompressedDDPStrategy
from lightning_optsurvey.strategies.easgd import EASGDStrategy
from lightning_optsurvey.strategies.easgd_async import AsyncEASGDStrategy, AsyncLSGDStrategy
from lightning_optsurvey.strategies.gossip import GOSSIP_STRATEGY_NAMES, GossipStrategy
from lightning_optsurvey.strategies.local_sgd import LocalSGDStrategy
from lightning_optsurvey.strategies.lsgd import LSGDStrategy
from lightning_optsurvey.strategies.topology import TOPOLOGY_KINDS, Topology

GossipStrategy.register_strategies(StrategyRegistry)
LocalSGDStrategy.register_strategies(StrategyRegistry)
EASGDStrategy.register_strategies(StrategyRegistry)
LSGDStrategy.register_strategies(StrategyRegistry)
AsyncEASGDStrategy.register_strategies(StrategyRegistry)
AsyncLSGDStrategy.register_strategies(StrategyRegistry)
CompressedDDPStrategy.register_strategies(StrategyRegistry)

#: The strategy names this package registers (derived from the registry, so it cannot go stale).
STRATEGY_NAMES: tuple[str, ...] = tuple(
    sorted(
        name
        for name, entry in StrategyRegistry.items()
        if isinstance(entry.get("strategy"), type)
        and issubclass(entry["strategy"], (LocalModelStrategy, CompressedDDPStrategy))
    )
)

__all__ = [
    "COMPRESSED_DDP_STRATEGY_NAMES",
    "GOSSIP_STRATEGY_NAMES",
    "QSGD",
    "STRATEGY_NAMES",
    "TOPOLOGY_KINDS",
    "AsyncEASGDStrategy",
    "AsyncLSGDStrategy",
    "CommCounter",
    "CompressedDDPStrategy",
    "Compressor",
    "EASGDStrategy",
    "FlatBuffers",
    "GossipStrategy",
    "LSGDStrategy",
    "LocalModelStrategy",
    "LocalSGDStrategy",
    "PeriodicSyncStrategy",
    "RandomK",
    "Sign",
    "TopK",
    "Topology",
    "consensus_distance",
]
