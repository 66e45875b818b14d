"""GossipStrategy in one process: registration, configuration errors, world size 1, comm helpers."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
import torch.distributed as dist
from _support import fit_digits
from _support import quiet_trainer as _trainer
from lightning.pytorch.strategies import StrategyRegistry

import lightning_optsurvey
from lightning_optsurvey.callbacks.consensus import ConsensusDistance
from lightning_optsurvey.strategies import (
    GOSSIP_STRATEGY_NAMES,
    CommCounter,
    FlatBuffers,
    GossipStrategy,
    Topology,
    consensus_distance,
)
from lightning_optsurvey.strategies._comm import ring_all_reduce_bytes
from lightning_optsurvey.tasks import ClassifierModule


def test_registered_names_build_the_right_topology() -> None:
    for name, kind in GOSSIP_STRATEGY_NAMES.items():
        assert name in StrategyRegistry
        strategy = _trainer(devices=4, strategy=name).strategy
        assert isinstance(strategy, GossipStrategy)
        assert strategy.topology == Topology(kind, 4)
    assert GOSSIP_STRATEGY_NAMES["gossip"] == "exponential"


def test_registration_is_idempotent_on_reimport() -> None:
    importlib.reload(lightning_optsurvey.strategies)
    importlib.reload(lightning_optsurvey)
    assert StrategyRegistry["gossip_ring"]["init_params"] == {"topology": "ring"}
    assert _trainer(devices=2, strategy="gossip_ring").strategy.topology == Topology("ring", 2)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"topology": "star"}, ValueError, "unknown topology 'star'"),
        ({"topology": 3}, TypeError, "topology must be a Topology"),
        ({"gossip_every": 0}, ValueError, "gossip_every must be an integer >= 1, got 0"),
        ({"gossip_every": 1.5}, TypeError, "gossip_every must be an integer"),
        ({"gossip_every": True}, TypeError, "gossip_every must be an integer"),
        ({"overlap": "yes"}, TypeError, "overlap must be a bool"),
        ({"algorithm": "sgp"}, ValueError, "unknown algorithm 'sgp'"),
        ({"topology_seed": "0"}, TypeError, "topology_seed must be an integer"),
        ({"find_unused_parameters": True}, TypeError, "does not take \\['find_unused_parameters'\\]"),
        ({"ddp_comm_hook": print}, TypeError, "DistributedDataParallel"),
    ],
)
def test_bad_arguments_raise_in_init(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        GossipStrategy(**kwargs)


def test_world_size_errors_raise_in_trainer_init() -> None:
    with pytest.raises(ValueError, match="got 5 \\(a prime\\)"):
        _trainer(devices=5, strategy="gossip_torus")
    with pytest.raises(ValueError, match="is for 8 ranks, but this run has 4"):
        _trainer(devices=4, strategy=GossipStrategy(Topology("ring", 8)))
    with pytest.raises(ValueError, match="is for 2 ranks, but this run has 4"):
        _trainer(devices=2, num_nodes=2, strategy=GossipStrategy(Topology("ring", 2)))
    with pytest.raises(ValueError, match="sync_batchnorm=True"):
        _trainer(devices=2, strategy="gossip", sync_batchnorm=True)


def _fit_digits(strategy, steps: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = ClassifierModule("cnn_bn", optimizer="sgd", optimizer_kwargs={"lr": 0.1, "momentum": 0.9})
    # No sampler replacement, so both runs see the loader's own shuffling order.
    trainer = fit_digits(module, 16, devices=1, strategy=strategy, max_steps=steps, deterministic=True,
                         use_distributed_sampler=False, callbacks=[ConsensusDistance(every_n_steps=2)])
    assert float(trainer.callback_metrics["gossip/consensus_distance"]) == 0.0
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_world_size_one_warns_and_trains_like_a_single_device() -> None:
    initialized_before = dist.is_initialized()
    with pytest.warns(UserWarning, match="single process"):
        gossip = _fit_digits(GossipStrategy("torus", overlap=True, algorithm="push_sum"))
    assert dist.is_initialized() == initialized_before  # no process group was created
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _fit_digits("auto")
    for name, tensor in reference.items():
        assert torch.equal(gossip[name], tensor), name


def test_flat_buffers_round_trip_per_dtype() -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(3, 4, generator=generator),
        torch.randn(5, generator=generator, dtype=torch.float64),
        torch.randn(2, 2, generator=generator),
        torch.randn(1, generator=generator).to(torch.bfloat16),
    ]
    originals = [t.clone() for t in tensors]
    flat = FlatBuffers(tensors)
    assert [(b.dtype, b.numel()) for b in flat.pack()] == [
        (torch.float32, 16), (torch.float64, 5), (torch.bfloat16, 1)
    ]
    assert flat.numel == 22 and flat.nbytes == 16 * 4 + 5 * 8 + 2
    assert torch.equal(flat.buffers[0], torch.cat([originals[0].flatten(), originals[2].flatten()]))
    scratch = [b * 2 for b in flat.pack()]
    flat.unpack(scratch)
    for tensor, original in zip(tensors, originals):
        assert torch.equal(tensor, original * 2)
    out = flat.like()
    flat.pack(out)
    assert all(torch.equal(a, b) for a, b in zip(out, scratch))
    with pytest.raises(ValueError, match="at least one tensor"):
        FlatBuffers([])


def test_comm_counter_and_ring_all_reduce_formula() -> None:
    assert ring_all_reduce_bytes(1000, 1) == 0
    assert ring_all_reduce_bytes(1000, 4) == 1500  # 2 (N-1)/N
    counter = CommCounter()
    counter.add_send(100, messages=2)
    counter.add_all_reduce(1000, 4)
    assert (counter.step_bytes, counter.total_bytes, counter.messages) == (1600, 1600, 2)
    counter.start_step()
    counter.add_send(10)
    assert (counter.step_bytes, counter.total_bytes) == (10, 1610)
    restored = CommCounter()
    restored.load_state_dict(counter.state_dict())
    assert (restored.total_bytes, restored.messages, restored.step_bytes) == (1610, 3, 0)


def test_consensus_distance_without_process_group_is_zero() -> None:
    value = consensus_distance([torch.ones(3), torch.zeros(2)])
    assert value.dtype == torch.float64 and float(value) == 0.0
