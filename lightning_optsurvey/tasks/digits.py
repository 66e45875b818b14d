"""Digits data module: scikit-learn's bundled 8x8 handwritten digits, no download.

The 1,797 images ship inside scikit-learn, so the default task runs offline. Splits are stratified
and seeded; the standardization is fitted on the training split only, so no statistic of the
validation or test images leaks into training.

``partition="dirichlet"`` or ``"shards"`` gives every rank its own label-skewed part of the training
set (see :mod:`lightning_optsurvey.tasks.partition`); the validation and test sets stay global.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

from lightning_optsurvey.tasks.partition import PartitionSampler, check_partition_args, partition_indices

NUM_CLASSES = 10
INPUT_SHAPE = (1, 8, 8)


def _check_fraction(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")


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
        ValueError: If a size or fraction is out of range, or the partition is unknown.
        TypeError: If ``seed``, ``alpha`` or ``shards_per_rank`` has the wrong type.

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
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        _check_fraction("val_fraction", val_fraction)
        _check_fraction("test_fraction", test_fraction)
        if val_fraction + test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction must leave at least 10% for training, "
                f"got {val_fraction} + {test_fraction}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        if not 0 <= seed < 2**32:  # scikit-learn's random_state range
            raise ValueError(f"seed must be in [0, 2**32), got {seed!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
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

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)

    def partition_sampler(self, rank: int | None = None, world_size: int | None = None) -> PartitionSampler | None:
        """This rank's :class:`PartitionSampler` (``None`` for ``partition="iid"``).

        ``rank`` and ``world_size`` default to the attached Trainer's (0 and 1 without one).
        """
        if self.partition == "iid":
            return None
        self.setup()
        assert self.train_set is not None
        own_rank, own_world = self._rank_and_world()
        rank = own_rank if rank is None else rank
        world_size = own_world if world_size is None else world_size
        labels = self.train_set.tensors[1]
        per_rank = -(-labels.numel() // world_size)
        parts = partition_indices(
            labels, world_size, self.partition, alpha=self.alpha, shards_per_rank=self.shards_per_rank,
            seed=self.seed, min_size=min(self.batch_size, labels.numel() // world_size),
        )
        return PartitionSampler(parts[rank], per_rank, rank, world_size, seed=self.seed)

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        sampler = self.partition_sampler() if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the order depends only on ``seed`` and the epoch."""
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        self.setup()
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        self.setup()
        return self._loader(self.test_set, shuffle=False)
