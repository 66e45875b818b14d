r"""Label-skewed partitions of a training set over ranks, as in the federated and decentralized literature.

:func:`partition_indices` splits the indices of a labelled data set into one part per rank:

- ``"iid"``: a seeded random permutation cut into equal parts (every rank sees every class in
  proportion).
- ``"dirichlet"``: for every class ``c``, proportions :math:`p_c \sim \mathrm{Dir}(\alpha \mathbf 1_N)`
  split that class's samples over the ``N`` ranks (Hsu, Qi & Brown 2019; Wang et al. 2020). Small
  ``alpha`` (0.1) gives most ranks only one or two classes; large ``alpha`` approaches ``"iid"``. Draws
  that leave a rank with fewer than ``min_size`` samples are redrawn (from the same seeded stream).
- ``"shards"``: the samples sorted by label are cut into ``N * shards_per_rank`` equal shards and each
  rank gets ``shards_per_rank`` of them at random (McMahan et al. 2017): at most ``shards_per_rank``
  classes per rank, up to shard boundaries.

:class:`PartitionSampler` iterates one rank's part. It is a ``DistributedSampler`` so that Lightning
does not shard it again; every rank yields the same number of samples per epoch (``ceil(total / N)``,
one pass over the whole training set per epoch, summed over ranks): a rank whose part is smaller
cycles through fresh permutations of its part, a larger one sees a different subset each epoch. Equal
lengths keep the collectives of every strategy (DDP's all-reduce, gossip rounds) in step. The order
depends only on ``seed``, the rank and the epoch, so a resumed run reproduces it.

Why our own: torch and Lightning only shard uniformly (``DistributedSampler``); the partitioners of
FedLab/Flower/LEAF come with their own training frameworks.

References:
    Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
    Classification", 2019, arXiv:1909.06335. McMahan et al., "Communication-Efficient Learning of Deep
    Networks from Decentralized Data", AISTATS 2017, arXiv:1602.05629. Lin et al., "Quasi-Global Momentum:
    Accelerating Decentralized Deep Learning on Heterogeneous Data", ICML 2021, arXiv:2102.04761.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

from lightning_optsurvey.validation import check_choice, check_float, check_int

__all__ = ["PARTITIONS", "PartitionSampler", "check_partition_args", "partition_indices"]

PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "shards")
_MAX_DRAWS = 1000


def check_partition_args(partition: str, alpha: float, shards_per_rank: int) -> None:
    """Raise ``ValueError``/``TypeError`` naming a bad ``partition``, ``alpha`` or ``shards_per_rank``."""
    check_choice("partition", partition, PARTITIONS)
    check_float("alpha (the Dirichlet concentration)", alpha, low=0.0, low_open=True)
    check_int("shards_per_rank", shards_per_rank, low=1)


def _dirichlet_split(labels: Tensor, num_parts: int, alpha: float, min_size: int, seed: int) -> list[Tensor]:
    # numpy's Generator has a seeded Dirichlet sampler; torch.distributions.Dirichlet takes no generator.
    rng = np.random.default_rng(seed)
    classes = labels.unique(sorted=True)
    for _ in range(_MAX_DRAWS):
        parts: list[list[Tensor]] = [[] for _ in range(num_parts)]
        for c in classes:
            members = torch.nonzero(labels == c).flatten()
            members = members[torch.as_tensor(rng.permutation(members.numel()))]
            proportions = rng.dirichlet(np.full(num_parts, alpha))
            cuts = np.round(np.cumsum(proportions) * members.numel()).astype(np.int64)
            cuts[-1] = members.numel()
            start = 0
            for part, stop in enumerate(cuts.tolist()):
                stop = max(start, min(stop, members.numel()))
                parts[part].append(members[start:stop])
                start = stop
        merged = [torch.cat(p) for p in parts]
        if min(m.numel() for m in merged) >= min_size:
            return merged
    raise ValueError(
        f"a Dirichlet({alpha}) split of {labels.numel()} samples over {num_parts} ranks left a rank with fewer "
        f"than {min_size} samples in {_MAX_DRAWS} draws; use a larger alpha or fewer ranks"
    )


def partition_indices(
    labels: Sequence[int] | Tensor,
    num_parts: int,
    partition: str = "iid",
    *,
    alpha: float = 0.5,
    shards_per_rank: int = 2,
    seed: int = 0,
    min_size: int = 1,
) -> list[Tensor]:
    """Split the indices ``0 .. len(labels) - 1`` into ``num_parts`` disjoint parts (one per rank).

    Args:
        labels: Integer class label of every sample.
        num_parts: Number of parts (ranks), at least 1.
        partition: ``"iid"``, ``"dirichlet"`` or ``"shards"`` (see the module docstring).
        alpha: Dirichlet concentration (``"dirichlet"`` only), positive.
        shards_per_rank: Shards per rank (``"shards"`` only), at least 1.
        seed: Seed of the split; the same arguments give the same parts on every rank.
        min_size: Fewest samples a part may have.

    Returns:
        ``num_parts`` sorted int64 index tensors whose union is every index exactly once.

    Raises:
        ValueError: For an unknown partition, out-of-range arguments, more shards than samples, or a
            split that cannot give every part ``min_size`` samples.
        TypeError: For arguments of the wrong type.

    Example:
        >>> parts = partition_indices([0, 0, 1, 1, 2, 2, 3, 3], 2, "shards", shards_per_rank=2, seed=0)
        >>> sorted(torch.cat(parts).tolist())
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    check_partition_args(partition, alpha, shards_per_rank)
    check_int("num_parts", num_parts, low=1)
    check_int("min_size", min_size, low=0)
    check_int("seed", seed, low=None)
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be a 1-D sequence of integer class labels, got shape {tuple(labels.shape)} "
                         f"and dtype {labels.dtype}")
    n = labels.numel()
    if n < num_parts * max(min_size, 1):
        raise ValueError(f"{n} samples cannot give {num_parts} parts at least {max(min_size, 1)} samples each")
    generator = torch.Generator().manual_seed(seed)
    if partition == "iid":
        parts = list(torch.randperm(n, generator=generator).tensor_split(num_parts))
    elif partition == "dirichlet":
        parts = _dirichlet_split(labels, num_parts, float(alpha), min_size, seed)
    else:
        num_shards = num_parts * shards_per_rank
        if num_shards > n:
            raise ValueError(f"{num_parts} ranks x {shards_per_rank} shards_per_rank = {num_shards} shards is more "
                             f"than the {n} samples")
        # Stable sort by label, ties broken by a seeded permutation (which samples of a class share a shard).
        order = torch.randperm(n, generator=generator)
        order = order[torch.sort(labels[order], stable=True).indices]
        shards = order.tensor_split(num_shards)
        assignment = torch.randperm(num_shards, generator=generator).view(num_parts, shards_per_rank)
        parts = [torch.cat([shards[s] for s in row.tolist()]) for row in assignment]
        if min(p.numel() for p in parts) < min_size:
            raise ValueError(f"a shard split gives parts of {min(p.numel() for p in parts)} samples, fewer than "
                             f"min_size={min_size}")
    return [p.sort().values for p in parts]


def _check_part(name: str, part: Any) -> None:
    if not isinstance(part, Tensor) or part.dim() != 1 or part.is_floating_point() or part.is_complex():
        got = (f"a tensor of shape {tuple(part.shape)} and dtype {part.dtype}" if isinstance(part, Tensor)
               else type(part).__name__)
        raise TypeError(f"{name} must be a 1-D integer tensor of sample indices, got {got}")


class PartitionSampler(DistributedSampler):
    """Yields one rank's part of a partition, shuffled per epoch; equal epoch length on every rank.

    Args:
        part: The indices of this rank's part (from :func:`partition_indices`).
        num_samples: Samples per epoch on every rank (``ceil(len(dataset) / world_size)`` in
            :class:`~lightning_optsurvey.tasks.DigitsDataModule`).
        rank: This rank (mixed into the shuffling seed).
        world_size: Number of ranks.
        seed: Shuffling seed; the order depends only on ``seed``, ``rank`` and the epoch.

    Raises:
        ValueError: If ``part`` is empty, ``num_samples`` or ``world_size`` is below 1, or ``rank`` is not in
            ``[0, world_size)``.
        TypeError: If ``part`` is not a 1-D integer tensor, or a count, rank or seed is not an integer.
    """

    def __init__(self, part: Tensor, num_samples: int, rank: int, world_size: int, seed: int = 0) -> None:
        # DistributedSampler's __init__ reads a dataset and the process group; set its attributes directly.
        _check_part("part", part)
        if part.numel() == 0:
            raise ValueError(f"rank {rank}'s part of the partition is empty")
        check_int("num_samples", num_samples, low=1)
        check_int("world_size", world_size, low=1)
        check_int("rank", rank, low=0, high=world_size - 1)
        check_int("seed", seed, low=None)
        self.part = part.clone()
        self.num_samples = int(num_samples)
        self.total_size = self.num_samples * world_size
        self.num_replicas = world_size
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.shuffle = True
        self.drop_last = False

    @classmethod
    def for_rank(cls, parts: Sequence[Tensor], rank: int, seed: int = 0) -> PartitionSampler:
        """Rank ``rank``'s sampler of a partition: ``parts`` holds one index tensor per rank.

        ``parts`` is what :func:`partition_indices` returns. Every rank yields ``ceil(total / len(parts))``
        samples per epoch (``total``: the samples of all parts), one pass over the data set per epoch summed
        over ranks, so every rank runs the same number of batches.

        Raises:
            TypeError: If ``parts`` is not a sequence of 1-D integer tensors, or ``rank`` or ``seed`` is not an
                integer.
            ValueError: If ``parts`` is empty, or ``rank`` is not in ``[0, len(parts))``.
        """
        if isinstance(parts, Tensor) or not isinstance(parts, Sequence):
            raise TypeError(f"parts must be a sequence of index tensors (one per rank), got {type(parts).__name__}")
        if len(parts) == 0:
            raise ValueError("parts must hold one index tensor per rank, got an empty sequence")
        for r, part in enumerate(parts):
            _check_part(f"parts[{r}]", part)
        check_int("rank", rank, low=0, high=len(parts) - 1)
        per_rank = -(-sum(part.numel() for part in parts) // len(parts))
        return cls(parts[rank], per_rank, rank, len(parts), seed=seed)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + 7919 * self.rank + 104729 * self.epoch)
        rounds = -(-self.num_samples // self.part.numel())
        order = torch.cat([self.part[torch.randperm(self.part.numel(), generator=generator)] for _ in range(rounds)])
        return iter(order[: self.num_samples].tolist())

    def __len__(self) -> int:
        return self.num_samples
