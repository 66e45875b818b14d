"""LocalSGDStrategy's arguments and the registered names of the centralized strategies.

The multi-process behaviour (H=1 equals DDP, post-local SGD's schedule and bytes, resume) is in
``tests/strategies/test_centralized.py``.
"""

from __future__ import annotations

import pytest
from lightning.pytorch import Trainer

import lightning_optsurvey  # noqa: F401  (registers the strategy names)
from lightning_optsurvey.strategies import EASGDStrategy, LocalSGDStrategy, LSGDStrategy


def test_invalid_arguments() -> None:
    for bad in (0, -3):
        with pytest.raises(ValueError, match="sync_every must be an integer >= 1, got"):
            LocalSGDStrategy(sync_every=bad)
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 0, got -1"):
        LocalSGDStrategy(warmup_steps=-1)
    with pytest.raises(TypeError, match="warmup_steps"):
        LocalSGDStrategy(warmup_steps=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sync_every"):
        LocalSGDStrategy(sync_every=True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="find_unused_parameters"):
        LocalSGDStrategy(find_unused_parameters=True)


@pytest.mark.parametrize(
    ("name", "cls", "attributes"),
    [
        ("local_sgd", LocalSGDStrategy, {"sync_every": 8, "warmup_steps": 0}),
        ("easgd", EASGDStrategy, {"rho": None, "sync_every": 4, "moving_rate": None, "beta": 0.9,
                                   "alpha_rule": "beta/N"}),
        ("lsgd", LSGDStrategy, {"pull_strength": 0.1, "sync_every": 4, "leader": "loss"}),
        ("grawa", LSGDStrategy, {"pull_strength": 0.1, "sync_every": 4, "leader": "grawa"}),
    ],
)
def test_registered_names_build_the_documented_defaults(name: str, cls: type, attributes: dict) -> None:
    trainer = Trainer(accelerator="cpu", devices=2, strategy=name, logger=False, enable_progress_bar=False)
    assert type(trainer.strategy) is cls
    for key, value in attributes.items():
        assert getattr(trainer.strategy, key) == value, key
    assert trainer.strategy.world_size == 2
