"""The pure maths of averaging between workers: gossip graphs and their weights, elastic averaging.

Lightning-free (``torch`` only): the strategies (:mod:`lightning_optsurvey.strategies`) build on it and
re-export its names, and the theory checks (:mod:`lightning_optsurvey.theory`) use it without Lightning.
"""

from lightning_optsurvey.averaging.elastic import (
    easgd_fixed_point,
    easgd_is_stable,
    easgd_quadratic_matrix,
    easgd_step,
)
from lightning_optsurvey.averaging.topology import STOCHASTIC_ATOL, TOPOLOGY_KINDS, Topology

__all__ = [
    "STOCHASTIC_ATOL",
    "TOPOLOGY_KINDS",
    "Topology",
    "easgd_fixed_point",
    "easgd_is_stable",
    "easgd_quadratic_matrix",
    "easgd_step",
]
