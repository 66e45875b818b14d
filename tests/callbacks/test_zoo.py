"""Conformance of every measuring callback on the model zoo (issue 12): user LightningModules with a GPT
(tied embeddings, causal attention with dropout, token-level loss), a BatchNorm ResNet, an LSTM, dict
batches with ``compute_loss`` and several inputs.

For every zoo model, with every callback of ``callbacks.__all__`` attached at once: every logged value is
finite, training is bitwise identical to training without them, and a run stopped after one epoch and
resumed from its checkpoint by fresh callbacks ends with the same weights and the same measurements. The
cross product (each callback alone on each model) is marked slow.

The callbacks and their fast configurations come from ``tests/_callback_configs.py`` (driven by
``callbacks.__all__``).
"""

from __future__ import annotations

import math

import pytest
import torch
from _callback_configs import FAST_CONFIGS
from _zoo import ZOO, DictModule, make
from lightning.pytorch import Trainer

from lightning_optsurvey.callbacks import GeneralizationMeasures, MeasuringCallback

EPOCHS = 2


def all_callbacks() -> list[MeasuringCallback]:
    return [factory() for factory in FAST_CONFIGS.values()]


def fit(name: str, callbacks: list, root, epochs: int = EPOCHS, ckpt_path: str | None = None):
    module, data = make(name)
    # A copy of the list: Lightning appends the entry-point callbacks (OptimizerLoopAdapter) to the one it gets.
    trainer = Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, deterministic=True,
                      default_root_dir=root, callbacks=list(callbacks), num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _check_conformance(name: str, callbacks: list, tmp_path) -> None:
    without, _ = fit(name, [], tmp_path / "plain")
    with_cbs, _ = fit(name, callbacks, tmp_path / "measured")
    assert_bitwise_equal(state(with_cbs), state(without))
    for cb in callbacks:
        assert len(cb.history) == EPOCHS, type(cb).__name__
        for h in cb.history:
            bad = {k: v for k, v in h.items() if not math.isfinite(v) and not _documented_nan(k, h)}
            assert not bad, (type(cb).__name__, bad)
    # stopped after one epoch, resumed from the checkpoint by fresh callbacks
    first = [FAST_CONFIGS[type(cb).__name__]() for cb in callbacks]
    _, trainer = fit(name, first, tmp_path / "a", epochs=1)
    ckpt = tmp_path / "a" / "stop.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = [FAST_CONFIGS[type(cb).__name__]() for cb in callbacks]
    module, _ = fit(name, resumed, tmp_path / "b", ckpt_path=str(ckpt))
    assert_bitwise_equal(state(module), state(without))
    for original, again in zip(callbacks, resumed):  # the first entry from the checkpoint, the second measured
        a, b = _untimed(again.history), _untimed(original.history)
        assert len(a) == len(b) == EPOCHS, type(original).__name__
        for x, y in zip(a, b):
            assert x == pytest.approx(y, rel=0, abs=0, nan_ok=True), type(original).__name__


def _documented_nan(key: str, h: dict[str, float]) -> bool:
    # B_simple is nan by definition when the unbiased |G|^2 estimate is not positive (tiny subsets).
    return key == "noise/b_simple" and h["noise/grad_sq_norm"] <= 0


def _untimed(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if not k.endswith("seconds")} for h in history]


@pytest.mark.parametrize("name", ZOO)
def test_every_callback_on_every_zoo_model(name, tmp_path):
    """All callbacks at once: finite values, bitwise non-perturbation, exact resume."""
    _check_conformance(name, all_callbacks(), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("callback", sorted(FAST_CONFIGS))
@pytest.mark.parametrize("name", ZOO)
def test_each_callback_alone_on_each_zoo_model(name, callback, tmp_path):
    _check_conformance(name, [FAST_CONFIGS[callback]()], tmp_path)


def test_the_readme_example_runs_and_measures_a_dict_batch_module(tmp_path, monkeypatch):
    """README's "Measuring callbacks on your module" example, run as written."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    match = re.search(r"### Measuring callbacks on your module.*?```python\n(.*?)```", readme, re.S)
    assert match, "README lacks the example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_example"}
    with pytest.warns(UserWarning, match="no accuracy for MyModule"):
        exec(compile(match.group(1), "README.md", "exec"), namespace)
    metrics = namespace["trainer"].callback_metrics
    assert math.isfinite(float(metrics["hessian/eig_1"])) and math.isfinite(float(metrics["gen_gap/loss"]))
    assert "gen_gap/acc" not in metrics


class _DictWithoutComputeLoss(DictModule):
    """Dict batches, the loss only inside ``training_step``: measurements cannot evaluate it."""

    compute_loss = None  # type: ignore[assignment]

    def loss_of(self, batch):
        return torch.nn.functional.cross_entropy(self(batch["x"], batch["extra"]), batch["label"])


@pytest.mark.parametrize("callback", sorted(FAST_CONFIGS))
def test_a_loss_it_cannot_evaluate_fails_at_the_first_batch_before_any_step(callback, tmp_path):
    """Dict batches and no ``compute_loss``: the error names the callback and what to add, before training."""
    cb = FAST_CONFIGS[callback]()
    _, data = make("dict")
    torch.manual_seed(0)
    module = _DictWithoutComputeLoss()
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                      callbacks=[cb], num_sanity_val_steps=0)
    if not cb.uses_loss():
        trainer.fit(module, datamodule=data)
        assert len(cb.history) == 1
        return
    with pytest.raises(ValueError, match=rf"{callback} measures the loss.*define compute_loss\(self, batch\)"):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 0


def test_norm_measures_need_no_loss_and_take_any_batch(tmp_path):
    cb = GeneralizationMeasures(measures=("param_norm", "distance_from_init", "frobenius_product"))
    assert not cb.uses_loss()
    _, data = make("dict")
    torch.manual_seed(0)
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                      callbacks=[cb], num_sanity_val_steps=0)
    trainer.fit(_DictWithoutComputeLoss(), datamodule=data)
    assert set(cb.history[0]) >= {"measures/param_norm", "measures/distance_from_init"}


@pytest.mark.parametrize("measure", ["path_norm", "spectral_product"])
def test_measures_that_need_an_input_fail_at_the_first_batch_without_one(measure, tmp_path):
    """Dict batches and no ``example_input_array``: refused before the first step, not after the first epoch."""
    cb = GeneralizationMeasures(measures=("param_norm", measure), every_n_epochs=None, at_fit_end=True)
    _, data = make("dict")
    torch.manual_seed(0)
    module = _DictWithoutComputeLoss()
    module.example_input_array = None
    trainer = Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                      callbacks=[cb], num_sanity_val_steps=0)
    with pytest.raises(RuntimeError, match=r"run the model on an input.*set self.example_input_array"):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 0


def test_the_batch_check_runs_again_in_a_later_fit(tmp_path):
    """A callback reused for a second fit checks that fit's batches too."""
    cb = FAST_CONFIGS["HessianSpectrum"]()
    fit("multi_input", [cb], tmp_path / "pairs", epochs=1)
    _, data = make("dict")
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                      callbacks=[cb], num_sanity_val_steps=0)
    with pytest.raises(ValueError, match="HessianSpectrum measures the loss"):
        trainer.fit(_DictWithoutComputeLoss(), datamodule=data)
    assert trainer.global_step == 0
