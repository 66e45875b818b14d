"""Distributed training strategies: decentralized gossip and centralized data-parallel methods.

Importing this package registers every strategy name in Lightning's ``StrategyRegistry``.
"""

__all__: list[str] = []
