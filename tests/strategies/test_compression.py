"""Compressors' contraction and unbiasedness against closed forms; argument checks of the new strategies."""

from __future__ import annotations

import math

import pytest
import torch
from _support import quiet_trainer as _trainer

import lightning_optsurvey  # noqa: F401  (registers the names)
from lightning_optsurvey.averaging.compression import QSGD, Compressor, RandomK, Sign, TopK, make_compressor
from lightning_optsurvey.strategies import STRATEGY_NAMES, CompressedDDPStrategy, GossipStrategy, Topology
from lightning_optsurvey.strategies.gossip_algorithms import d2_is_stable

Z = 5.0  # standard errors allowed between a Monte-Carlo mean and its exact expectation
DRAWS = 4000


def _x(n: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _draws(compressor: Compressor, x: torch.Tensor, draws: int = DRAWS) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.stack([compressor(x, generator) for _ in range(draws)])


def test_topk_keeps_the_largest_and_contracts_by_k_over_n() -> None:
    x = _x()
    compressor = TopK(0.1)
    out = compressor(x)
    k = compressor.k(50)
    assert k == 5 and int((out != 0).sum()) == 5
    assert torch.equal(out[out != 0].abs().sort().values, x.abs().sort().values[-5:])
    for seed in range(20):
        x = _x(seed=seed)
        assert (compressor(x) - x).square().sum() <= (1 - compressor.delta(50)) * x.square().sum()
    assert compressor.payload_bytes(50, torch.float32) == 5 * (4 + 4)  # values + int32 indices
    assert TopK(1e-6).k(50) == 1 and TopK(1.0).k(50) == 50


def test_randomk_error_has_its_exact_expectation_and_unbiased_randomk_is_unbiased() -> None:
    x = _x()
    n, k = 50, 10
    errors = (_draws(RandomK(0.2), x) - x).square().sum(1)
    expected = (1 - k / n) * float(x.square().sum())
    assert abs(float(errors.mean()) - expected) <= Z * float(errors.std()) / math.sqrt(DRAWS)
    assert RandomK(0.2).delta(n) == pytest.approx(k / n)
    samples = _draws(RandomK(0.2, unbiased=True), x)
    # Per coordinate: x_i * (n/k) with probability k/n, else 0: variance x_i^2 (n/k - 1).
    stderr = x.abs() * math.sqrt(n / k - 1) / math.sqrt(DRAWS)
    assert bool(((samples.mean(0) - x).abs() <= Z * stderr + 1e-12).all())
    assert RandomK(0.2, unbiased=True).delta(n) == 0.0


def test_qsgd_is_unbiased_with_the_closed_form_variance_and_its_scaled_form_contracts() -> None:
    x, levels = _x(), 4
    samples = _draws(QSGD(levels, unbiased=True), x)
    norm = float(x.norm())
    p = levels * x.abs() / norm - (levels * x.abs() / norm).floor()
    variance = (norm / levels) ** 2 * p * (1 - p)  # one stochastic rounding per coordinate
    assert bool(((samples.mean(0) - x).abs() <= Z * (variance / DRAWS).sqrt() + 1e-12).all())
    measured = samples.var(0)
    assert float(measured.sum()) == pytest.approx(float(variance.sum()), rel=Z * math.sqrt(2 / DRAWS))
    omega = min(50 / levels**2, math.sqrt(50) / levels)
    assert float(variance.sum()) <= omega * norm**2  # QSGD's Lemma 3.1
    scaled = QSGD(levels)
    assert scaled.delta(50) == pytest.approx(1 / (1 + omega))
    errors = (_draws(scaled, x, 500) - x).square().sum(1)
    assert float(errors.mean()) <= (1 - scaled.delta(50)) * norm**2
    assert scaled.payload_bytes(50, torch.float32) == 4 + 50  # the norm + one int8 per element
    assert torch.equal(QSGD()(torch.zeros(7)), torch.zeros(7))


@pytest.mark.parametrize("n", [1, 7, 8, 13])
def test_sign_packs_bits_and_its_error_is_the_closed_form(n: int) -> None:
    x = _x(n)
    out = Sign()(x)
    scale = x.abs().sum() / n
    assert torch.equal(out, torch.where(x >= 0, scale, -scale))
    error = float((out - x).square().sum())
    assert error == pytest.approx((1 - float(x.abs().sum()) ** 2 / (n * float(x.square().sum()))) * float(
        x.square().sum()), rel=1e-12, abs=1e-12)
    assert Sign().payload_bytes(n, torch.float32) == 4 + math.ceil(n / 8)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (("lowrank",), ValueError, "compressor must be one of .*, got 'lowrank'"),
        ((3,), TypeError, "compressor must be a name"),
        (("topk", 0.0), ValueError, "ratio"),
        (("topk", 1.5), ValueError, "ratio"),
    ],
)
def test_make_compressor_rejects_bad_input(args, error, match) -> None:
    with pytest.raises(error, match=match):
        make_compressor(*args)
    with pytest.raises(ValueError, match=r"levels must be an integer in \[1, 127\]"):
        QSGD(levels=200)


def test_d2_stability_condition() -> None:
    # Ring of 4: eigenvalue -1/3 gives the root -1 of z^2 + 2z/3 - 1/3; ring of 5: lambda_min = -0.206.
    assert not d2_is_stable(Topology("ring", 4).mixing_matrix())
    assert d2_is_stable(Topology("ring", 5).mixing_matrix())
    ring = Topology("ring", 8).mixing_matrix()
    assert d2_is_stable((torch.eye(8, dtype=torch.float64) + ring) / 2)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"algorithm": "d2", "gossip_every": 2}, ValueError, "gossips after every step"),
        ({"algorithm": "gradient_tracking", "overlap": True}, ValueError, "gossips after every step"),
        ({"algorithm": "dpsgd", "compressor": "topk"}, ValueError, "compressor is CHOCO's"),
        ({"algorithm": "d2", "ratio": 0.1}, ValueError, "ratio configures CHOCO-SGD"),
        ({"algorithm": "dpsgd", "consensus_lr": 0.5}, ValueError, "consensus_lr configures CHOCO-SGD"),
        ({"algorithm": "choco", "compressor": "lowrank"}, ValueError, "compressor must be one of"),
        ({"algorithm": "choco", "ratio": 2.0}, ValueError, "ratio"),
        ({"algorithm": "choco", "consensus_lr": 0.0}, ValueError, "consensus_lr must be in"),
        ({"algorithm": "choco", "consensus_lr": "1"}, TypeError, "consensus_lr must be a real number"),
        ({"algorithm": "choco", "compression_seed": 1.0}, TypeError, "compression_seed"),
        ({"algorithm": "choco", "compressor": "qsgd", "ratio": 0.1}, ValueError, "compressor='qsgd' does not use it"),
        ({"algorithm": None}, TypeError, "algorithm must be a name among"),
        ({"algorithm": ["d2"]}, TypeError, "algorithm must be a name among"),
    ],
)
def test_bad_algorithm_arguments_raise_in_init(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        GossipStrategy("ring", **kwargs)


def test_registered_names_and_static_topology_requirement() -> None:
    for name, algorithm in (("gossip_d2", "d2"), ("gossip_gt", "gradient_tracking"), ("gossip_choco", "choco")):
        strategy = _trainer(devices=4, strategy=name).strategy
        assert isinstance(strategy, GossipStrategy) and strategy.algorithm == algorithm
        assert strategy.topology == Topology("ring", 4) and name in STRATEGY_NAMES
    for name, compression in (("ddp_fp16", "fp16"), ("ddp_bf16", "bf16"), ("ddp_powersgd", "powersgd")):
        strategy = _trainer(devices=2, strategy=name).strategy
        assert isinstance(strategy, CompressedDDPStrategy) and strategy.compression == compression
        assert name in STRATEGY_NAMES
    with pytest.raises(ValueError, match="needs a static topology"):
        _trainer(devices=4, strategy=GossipStrategy("one_peer_exponential", algorithm="d2"))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"compression": "int8"}, ValueError, "compression must be one of .*, got 'int8'"),
        ({"ddp_comm_hook": print}, TypeError, "sets the DDP communication hook itself"),
        ({"matrix_approximation_rank": 0}, ValueError, "matrix_approximation_rank must be an integer >= 1"),
        ({"start_powersgd_iter": 1}, ValueError, "start_powersgd_iter must be an integer >= 2"),
        ({"min_compression_rate": 0.5}, ValueError, "min_compression_rate"),
        ({"compression": "fp16", "matrix_approximation_rank": 4}, ValueError,
         "matrix_approximation_rank configures PowerSGD; compression='fp16' does not use it"),
        ({"timeout": "10"}, TypeError, "timeout must be a datetime.timedelta or a number of seconds"),
        ({"timeout": -5}, ValueError, "timeout must be in"),
    ],
)
def test_compressed_ddp_rejects_bad_arguments(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        CompressedDDPStrategy(**kwargs)


def test_compressed_ddp_takes_a_timeout_in_seconds_like_the_other_strategies() -> None:
    from datetime import timedelta

    assert CompressedDDPStrategy("fp16", timeout=30)._timeout_given == timedelta(seconds=30)
    assert CompressedDDPStrategy("fp16")._timeout_given is None  # 5 minutes with gloo, set with the process group
