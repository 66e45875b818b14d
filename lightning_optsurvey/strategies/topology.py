"""Communication graphs for decentralized training; they live in :mod:`lightning_optsurvey.averaging.topology`.

Kept so that ``from lightning_optsurvey.strategies.topology import Topology`` goes on working; the
implementation is Lightning-free so that the theory checks can use it without Lightning.
"""

from lightning_optsurvey.averaging.topology import STOCHASTIC_ATOL, TOPOLOGY_KINDS, Topology

__all__ = ["STOCHASTIC_ATOL", "TOPOLOGY_KINDS", "Topology"]
