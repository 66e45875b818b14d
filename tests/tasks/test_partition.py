"""Label-skewed partitions: disjoint covers, the Dirichlet law's moments, shard classes, per-rank samplers."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule
from lightning_optsurvey.tasks.partition import PartitionSampler, partition_indices

LABELS = torch.arange(10).repeat_interleave(60)  # 10 classes x 60 samples


@pytest.mark.parametrize(("partition", "kwargs"), [("iid", {}), ("dirichlet", {"alpha": 0.1}),
                                                   ("shards", {"shards_per_rank": 3})])
def test_parts_are_a_disjoint_cover_and_reproducible(partition, kwargs) -> None:
    parts = partition_indices(LABELS, 6, partition, seed=3, **kwargs)
    assert len(parts) == 6
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(LABELS.numel()))
    again = partition_indices(LABELS, 6, partition, seed=3, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = partition_indices(LABELS, 6, partition, seed=4, **kwargs)
    assert not all(torch.equal(a, b) for a, b in zip(parts, other))


def test_iid_parts_have_equal_sizes() -> None:
    sizes = [p.numel() for p in partition_indices(LABELS, 7, "iid")]
    assert max(sizes) - min(sizes) <= 1


def test_shards_give_each_rank_at_most_its_shards_classes() -> None:
    # 10 classes of 60 into 20 shards of 30: a shard never straddles a class, so <= 2 classes per rank.
    parts = partition_indices(LABELS, 10, "shards", shards_per_rank=2, seed=1)
    for part in parts:
        assert part.numel() == 60
        assert 1 <= LABELS[part].unique().numel() <= 2


def test_dirichlet_shares_have_the_dirichlet_mean_and_variance() -> None:
    """Share of class c on rank r: mean 1/N, variance (1/N)(1 - 1/N)/(N alpha + 1) (Dirichlet marginals)."""
    n, alpha, draws = 4, 0.5, 150
    shares = []
    for seed in range(draws):
        parts = partition_indices(LABELS, n, "dirichlet", alpha=alpha, seed=seed, min_size=0)
        counts = torch.stack([torch.bincount(LABELS[p], minlength=10) for p in parts]).double()  # (rank, class)
        shares.append(counts / 60.0)
    shares = torch.stack(shares)  # (draw, rank, class)
    mean, var = 1.0 / n, (1.0 / n) * (1 - 1.0 / n) / (n * alpha + 1)
    samples = shares.reshape(-1).numel()
    # Shares of one class over ranks are dependent; bounds use the draw count only (conservative).
    assert abs(float(shares.mean()) - mean) <= 4 * math.sqrt(var / draws)
    measured_var = float(shares.var())
    assert measured_var == pytest.approx(var, rel=4 * math.sqrt(2 / draws)), (measured_var, var, samples)


def test_small_alpha_skews_and_large_alpha_approaches_iid() -> None:
    def classes_per_rank(alpha: float) -> float:
        parts = partition_indices(LABELS, 5, "dirichlet", alpha=alpha, seed=0, min_size=0)
        return sum(int((torch.bincount(LABELS[p], minlength=10) >= 6).sum()) for p in parts) / 5

    assert classes_per_rank(0.05) <= 3
    assert classes_per_rank(1000.0) == 10


def test_dirichlet_redraws_until_every_part_has_min_size() -> None:
    parts = partition_indices(LABELS, 8, "dirichlet", alpha=0.1, seed=0, min_size=20)
    assert min(p.numel() for p in parts) >= 20
    # alpha -> 0 gives whole classes of 60 to single ranks: 3 parts of >= 190 would need 12 classes.
    with pytest.raises(ValueError, match="fewer than 190 samples"):
        partition_indices(LABELS, 3, "dirichlet", alpha=0.001, seed=0, min_size=190)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"partition": "label_skew"}, ValueError, "partition must be one of .*, got 'label_skew'"),
        ({"partition": "dirichlet", "alpha": 0.0}, ValueError, "alpha"),
        ({"partition": "dirichlet", "alpha": float("nan")}, ValueError, "alpha"),
        ({"partition": "dirichlet", "alpha": "0.1"}, TypeError, "alpha .* must be a real number"),
        ({"partition": "shards", "shards_per_rank": 0}, ValueError, "shards_per_rank must be an integer >= 1"),
        ({"partition": "shards", "shards_per_rank": 2.0}, TypeError, "shards_per_rank must be an integer"),
    ],
)
def test_bad_partition_arguments_raise_in_the_datamodule(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        DigitsDataModule(**kwargs)
    with pytest.raises(error, match=match):
        partition_indices(LABELS, 2, **{"partition": "iid", **kwargs})


def test_partition_indices_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="num_parts must be an integer >= 1"):
        partition_indices(LABELS, 0)
    with pytest.raises(ValueError, match="more than the 600 samples"):
        partition_indices(LABELS, 100, "shards", shards_per_rank=7)
    with pytest.raises(ValueError, match="integer class labels"):
        partition_indices(torch.rand(10), 2)


def test_sampler_yields_only_its_part_with_equal_lengths_and_epoch_order() -> None:
    part = torch.tensor([3, 8, 11])
    sampler = PartitionSampler(part, num_samples=7, rank=1, world_size=4, seed=0)
    first = list(sampler)
    assert len(first) == len(sampler) == 7 and set(first) == {3, 8, 11}
    assert sorted(first[:3]) == [3, 8, 11]  # whole permutations first, then the next permutation
    assert list(sampler) == first  # same epoch, same order
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_for_rank_gives_every_rank_the_same_epoch_length_over_its_own_part() -> None:
    parts = partition_indices(LABELS, 4, "dirichlet", alpha=0.1, seed=2)
    samplers = [PartitionSampler.for_rank(parts, rank, seed=5) for rank in range(4)]
    assert {len(s) for s in samplers} == {150}  # ceil(600 / 4): one pass over the data per epoch, all ranks
    assert sum(p.numel() < 150 for p in parts) and sum(p.numel() > 150 for p in parts)  # small and large parts
    for sampler, part in zip(samplers, parts):
        seen = list(sampler)
        assert set(seen) <= set(part.tolist())
        if part.numel() >= 150:
            assert len(set(seen)) == 150  # a large part: a subset, without repetition
        else:
            assert set(seen) == set(part.tolist())  # a small part: all of it, then again


def test_for_rank_rejects_what_is_not_a_partition() -> None:
    parts = partition_indices(LABELS, 2)
    with pytest.raises(TypeError, match="parts must be a sequence"):
        PartitionSampler.for_rank(torch.stack(parts), 0)
    with pytest.raises(ValueError, match="empty sequence"):
        PartitionSampler.for_rank([], 0)
    with pytest.raises(TypeError, match=r"parts\[1\] must be a 1-D integer tensor.*float32"):
        PartitionSampler.for_rank([parts[0], parts[1].float()], 0)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, 1\], got 2"):
        PartitionSampler.for_rank(parts, 2)
    with pytest.raises(TypeError, match="seed"):
        PartitionSampler.for_rank(parts, 0, seed=0.5)


def test_datamodule_gives_ranks_their_parts_and_keeps_validation_global() -> None:
    dm = DigitsDataModule(batch_size=16, partition="dirichlet", alpha=0.1, seed=0)
    dm.setup()
    labels = dm.train_set.tensors[1]
    samplers = [dm.partition_sampler(rank, 4) for rank in range(4)]
    assert torch.equal(torch.cat([s.part for s in samplers]).sort().values, torch.arange(labels.numel()))
    assert {len(s) for s in samplers} == {math.ceil(labels.numel() / 4)}
    assert dm.partition_sampler(0, 1).part.numel() == labels.numel()  # one process: everything
    assert len(dm.val_dataloader().dataset) == len(DigitsDataModule(batch_size=16).val_dataloader().dataset)


def test_a_single_process_fit_uses_the_partition_sampler_and_logs_the_partition(tmp_path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    dm = DigitsDataModule(batch_size=32, partition="shards", shards_per_rank=2)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, logger=CSVLogger(tmp_path),
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0)
    trainer.fit(ClassifierModule(model="mlp"), datamodule=dm)
    sampler = trainer.train_dataloader.sampler  # the resumable epoch sampler, visiting the partition's order
    assert isinstance(sampler.partition, PartitionSampler)
    assert sampler.rank_indices() == list(sampler.partition)
    hparams = (tmp_path / "lightning_logs" / "version_0" / "hparams.yaml").read_text()
    assert "partition: shards" in hparams and "shards_per_rank: 2" in hparams
