"""Digits data module: scikit-learn's bundled 8x8 handwritten digits, no download.

The 1,797 images ship inside scikit-learn, so the default task runs offline. Splits are stratified
and seeded; the standardization is fitted on the training split only, so no statistic of the
validation or test images leaks into training.

``partition="dirichlet"`` or ``"shards"`` gives every rank its own label-skewed part of the training
set (see :mod:`lightning_optsurvey.tasks.partition`); the validation and test sets stay global.

Exact resume. The training order depends only on ``seed`` and the epoch (:class:`EpochSampler`, a
``DistributedSampler`` that Lightning leaves in place), and the training loader is *stateful* in
Lightning's sense (:class:`ResumableDataLoader` has ``state_dict``/``load_state_dict``, which the fit
loop stores in every checkpoint under ``loops.fit_loop.state_dict.combined_loader``). Its state is the
epoch and the number of samples of that epoch the training loop has *processed*, read from the
trainer's batch progress: counting the indices the sampler has handed out would over-count whenever
the loader reads ahead (worker processes fetch ``prefetch_factor`` batches in advance), and a batch
that failed mid-step is re-run by Lightning on resume. Without a trainer the loader falls back to the
yielded count. A run resumed from a checkpoint taken mid-epoch or at an epoch end therefore sees
exactly the batches the uninterrupted run sees. Every loader has its own ``generator``, so building
loaders never draws from torch's global generator; :class:`~lightning_optsurvey.callbacks.ResumeRNG`
(attached by ``ClassifierModule``) checkpoints the global generators themselves, for dropout and noisy
optimizers. torchdata's ``StatefulDataLoader`` is not a
dependency (and counts what its workers fetched), hence this small class.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from lightning_optsurvey import _compat
from lightning_optsurvey.tasks.partition import PartitionSampler, check_partition_args, partition_indices
from lightning_optsurvey.validation import check_int, check_probability

NUM_CLASSES = 10
INPUT_SHAPE = (1, 8, 8)


class EpochSampler(DistributedSampler):
    """This rank's share of a dataset, reshuffled from ``seed + epoch`` only, and resumable mid-epoch.

    A :class:`~torch.utils.data.distributed.DistributedSampler` (so Lightning does not wrap or replace
    it), with ``num_replicas=1, rank=0`` in a single process. :meth:`rank_indices` is the epoch's index
    list of this rank (override it for other partitions of the data); an iteration starts ``start``
    samples into it, after :meth:`load_state_dict` of a mid-epoch state. Like ``DistributedSampler``,
    the epoch advances only through :meth:`set_epoch` (Lightning calls it before every epoch).

    Args:
        dataset: The dataset to sample from (only its length is used).
        num_replicas: Number of ranks sharing the data.
        rank: This rank.
        shuffle: Shuffle with ``seed + epoch`` (otherwise the order is 0, 1, ...).
        seed: Seed of the shuffle; equal on every rank.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0  # samples of the current epoch to skip in the next iteration
        self.yielded = 0  # samples of the current epoch handed out so far (the fallback position)

    def rank_indices(self) -> list[int]:
        """Indices this rank visits in the current epoch, in order (a function of seed and epoch only)."""
        return list(super().__iter__())

    def __iter__(self) -> Iterator[int]:
        indices = self.rank_indices()
        start, self.start = self.start, 0
        self.yielded = start
        for index in indices[start:]:
            self.yielded += 1
            yield index

    def set_epoch(self, epoch: int) -> None:
        """Enter ``epoch``; a position loaded for this same epoch is kept (Lightning re-sets it on resume)."""
        if epoch != self.epoch:
            self.start = 0
            self.yielded = 0
        super().set_epoch(epoch)

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """Epoch and position; ``consumed`` (samples processed this epoch) overrides the yielded count."""
        position = self.yielded if consumed is None else consumed
        if position >= self.num_samples:  # the epoch is over: the next one starts from its beginning
            return {"epoch": self.epoch + 1, "start": 0, "seed": self.seed}
        return {"epoch": self.epoch, "start": position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict`: the next iteration is the rest of that epoch."""
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(
                f"the checkpoint's data order was drawn with seed={state['seed']}, this sampler has "
                f"seed={self.seed}; resume with the same DigitsDataModule(seed=...)"
            )
        self.epoch = int(state["epoch"])
        self.start = int(state["start"])
        self.yielded = self.start


class _PartitionEpochSampler(EpochSampler):
    """An :class:`EpochSampler` that visits a :class:`PartitionSampler`'s order (one rank's part).

    Partitioned runs thereby resume exactly too.
    """

    def __init__(self, dataset: Dataset, partition: PartitionSampler) -> None:
        super().__init__(dataset, num_replicas=partition.num_replicas, rank=partition.rank, shuffle=True,
                         seed=partition.seed)
        self.partition = partition
        self.num_samples = partition.num_samples
        self.total_size = partition.total_size

    def rank_indices(self) -> list[int]:
        self.partition.set_epoch(self.epoch)
        return list(iter(self.partition))


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochSampler` whose position Lightning checkpoints.

    ``state_dict`` reports the samples the training loop has processed in this epoch (the batches
    Lightning's fit loop counts, times the batch size) when the loader knows its trainer (set
    ``loader.trainer_ref`` to a callable returning it, as :class:`DigitsDataModule` does), else the
    samples its sampler has yielded.
    """

    trainer_ref: Any = None

    def _consumed(self) -> int | None:
        trainer = self.trainer_ref() if self.trainer_ref is not None else None
        if trainer is None or getattr(trainer.state, "fn", None) != "fit":
            return None
        processed = _compat.processed_batches(trainer)
        return min(processed * int(self.batch_size or 1), self.sampler.num_samples)

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict(self._consumed())

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


class DigitsDataModule(LightningDataModule):
    """Stratified train/validation/test splits of scikit-learn's digits as 1x8x8 float tensors.

    Args:
        batch_size: Samples per batch for every loader.
        val_fraction: Fraction of all images held out for validation.
        test_fraction: Fraction of all images held out for testing.
        seed: Seed of the split and of the training loader's shuffling.
        num_workers: DataLoader worker processes.
        partition: How the training set is spread over the ranks of a distributed run: ``"iid"``
            (default; Lightning's ``DistributedSampler``, a fresh uniform share every epoch),
            ``"dirichlet"`` (per-class Dirichlet(``alpha``) proportions) or ``"shards"``
            (``shards_per_rank`` label-sorted shards per rank). The split is seeded by ``seed`` and
            fixed for the run; each rank then draws ``ceil(n_train / world_size)`` samples per epoch
            from its own part (:class:`~lightning_optsurvey.tasks.partition.PartitionSampler`).
            Validation and test sets stay global. With one process, the single part is everything.
        alpha: Dirichlet concentration for ``partition="dirichlet"`` (0.1: about one class per rank).
        shards_per_rank: Shards per rank for ``partition="shards"``.

    Raises:
        ValueError: If a size, seed or fraction is out of range, or the partition is unknown.
        TypeError: If an argument has the wrong type (a float ``batch_size``, a string fraction, ...).

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), x.dtype
        ((32, 1, 8, 8), torch.float32)
    """

    num_classes = NUM_CLASSES
    input_shape = INPUT_SHAPE

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        partition: str = "iid",
        alpha: float = 0.5,
        shards_per_rank: int = 2,
    ) -> None:
        super().__init__()
        check_int("batch_size", batch_size)
        check_probability("val_fraction", val_fraction, low_open=True, high_open=True)
        check_probability("test_fraction", test_fraction, low_open=True, high_open=True)
        if val_fraction + test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction must leave at least 10% for training, "
                f"got {val_fraction} + {test_fraction}"
            )
        check_int("seed", seed, low=0, high=2**32 - 1)  # scikit-learn's random_state range
        check_int("num_workers", num_workers, low=0)
        check_partition_args(partition, alpha, shards_per_rank)
        self.save_hyperparameters()  # logged as run params by every logger, the partition included
        self.batch_size = batch_size
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.seed = seed
        self.num_workers = num_workers
        self.partition = partition
        self.alpha = float(alpha)
        self.shards_per_rank = shards_per_rank
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load, split and standardize the images (idempotent)."""
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.preprocessing import StandardScaler

        data = load_digits()
        x, y = data.data, data.target
        x_rest, x_test, y_rest, y_test = train_test_split(
            x, y, test_size=self.test_fraction, stratify=y, random_state=self.seed
        )
        val_of_rest = self.val_fraction / (1.0 - self.test_fraction)
        x_train, x_val, y_train, y_val = train_test_split(
            x_rest, y_rest, test_size=val_of_rest, stratify=y_rest, random_state=self.seed
        )
        scaler = StandardScaler().fit(x_train)

        def to_set(features, labels) -> TensorDataset:
            images = torch.as_tensor(scaler.transform(features), dtype=torch.float32).reshape(-1, *INPUT_SHAPE)
            return TensorDataset(images, torch.as_tensor(labels, dtype=torch.long))

        self.train_set = to_set(x_train, y_train)
        self.val_set = to_set(x_val, y_val)
        self.test_set = to_set(x_test, y_test)

    def partition_sampler(self, rank: int | None = None, world_size: int | None = None) -> PartitionSampler | None:
        """This rank's :class:`PartitionSampler` (``None`` for ``partition="iid"``).

        ``rank`` and ``world_size`` default to the attached Trainer's (0 and 1 without one).
        """
        if self.partition == "iid":
            return None
        self.setup()
        assert self.train_set is not None
        own_world, own_rank = self._replicas()
        rank = own_rank if rank is None else rank
        world_size = own_world if world_size is None else world_size
        labels = self.train_set.tensors[1]
        parts = partition_indices(
            labels, world_size, self.partition, alpha=self.alpha, shards_per_rank=self.shards_per_rank,
            seed=self.seed, min_size=min(self.batch_size, labels.numel() // world_size),
        )
        return PartitionSampler.for_rank(parts, rank, seed=self.seed)

    def _generator(self) -> torch.Generator:
        # A loader's own generator: creating its iterator then draws from it, not from torch's global
        # generator, so data loading leaves the global RNG (dropout, noisy optimizers) alone and a run
        # resumed at an epoch end sees the same global RNG stream as the uninterrupted run.
        return torch.Generator().manual_seed(self.seed)

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=self._generator(),
        )

    def _replicas(self) -> tuple[int, int]:
        """``(num_replicas, rank)`` of the attached trainer's data split, ``(1, 0)`` without one."""
        trainer = self._trainer_or_none()
        if trainer is None or trainer.world_size <= 1:
            return 1, 0
        if not _compat.uses_distributed_sampler(trainer):
            return 1, 0  # the user asked every rank to see all the data
        kwargs = trainer.distributed_sampler_kwargs or {}
        return int(kwargs.get("num_replicas", trainer.world_size)), int(kwargs.get("rank", trainer.global_rank))

    def _trainer_or_none(self) -> Any:
        return getattr(self, "trainer", None)

    def train_sampler(self) -> EpochSampler:
        """This rank's training sampler: one order per ``seed`` and epoch (its own part under a partition)."""
        self.setup()
        partition = self.partition_sampler()
        if partition is not None:
            return _PartitionEpochSampler(self.train_set, partition)
        num_replicas, rank = self._replicas()
        return EpochSampler(self.train_set, num_replicas=num_replicas, rank=rank, shuffle=True, seed=self.seed)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, resumable mid-epoch.

        The order depends only on ``seed`` and the epoch, and the loader's position inside an epoch is
        saved in checkpoints (exact resume).
        """
        self.setup()
        loader = ResumableDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=self.train_sampler(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=self._generator(),
        )
        datamodule = weakref.ref(self)  # the loader must not keep the data module alive
        loader.trainer_ref = lambda: getattr(datamodule(), "trainer", None)
        return loader

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        self.setup()
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        self.setup()
        return self._loader(self.test_set, shuffle=False)
