"""Conformance of every measuring callback on the model zoo (issue 12): user LightningModules with a GPT
(tied embeddings, causal attention with dropout, token-level loss), a BatchNorm ResNet, an LSTM, dict
batches with ``compute_loss`` and several inputs.

For every zoo model, with every callback of ``callbacks.__all__`` attached at once: every logged value is
finite, training is bitwise identical to training without them, and a run stopped after one epoch and
resumed from its checkpoint by fresh callbacks ends with the same weights and the same measurements. The
cross product (each callback alone on each model) is marked slow.

A callback added to ``callbacks.__all__`` without an entry in ``FAST_CONFIGS`` fails
``test_every_measuring_callback_has_a_fast_config``.
"""

from __future__ import annotations

import math

import pytest
import torch
from _zoo import ZOO, make
from lightning.pytorch import Trainer

from lightning_optsurvey import callbacks as cbs
from lightning_optsurvey.callbacks import MeasuringCallback

FAST_CONFIGS = {
    "HessianSpectrum": lambda: cbs.HessianSpectrum(top_k=1, bottom_k=1, trace=True, trace_matvecs=6, tol=1e-2,
                                                   max_iter=12),
    "Sharpness": lambda: cbs.Sharpness(kinds=("sam", "adaptive_worst_case", "average", "keskar",
                                              "pac_bayes_sigma"), steps=2, num_samples=2, num_batches=1),
    "GeneralizationGap": lambda: cbs.GeneralizationGap(num_train_batches=2),
    "GradientNoiseScale": lambda: cbs.GradientNoiseScale(num_batches=2),
    "EdgeOfStability": lambda: cbs.EdgeOfStability(num_batches=1, tol=1e-2),
    "LossLandscape": lambda: cbs.LossLandscape(kind="1d", directions="init_to_final", resolution=3,
                                               num_batches=1, at="epoch_end"),
    "GeneralizationMeasures": lambda: cbs.GeneralizationMeasures(num_batches=1),
    "ConsensusDistance": lambda: cbs.ConsensusDistance(every_n_steps=None, every_n_epochs=1),
}

EPOCHS = 2


def _measuring_callback_names() -> set[str]:
    out = set()
    for name in cbs.__all__:
        obj = getattr(cbs, name)
        if isinstance(obj, type) and issubclass(obj, MeasuringCallback) and obj is not MeasuringCallback:
            out.add(name)
    return out


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


def test_every_measuring_callback_has_a_fast_config():
    assert _measuring_callback_names() == set(FAST_CONFIGS)


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
