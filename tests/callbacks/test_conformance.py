"""Conformance of every measuring callback in ``callbacks.__all__`` (its fast configuration in
``tests/_callback_configs.py``): it has one, it survives ddp_spawn pickling, its arguments follow the
validation rule, and a LightningCLI YAML config builds it (typed sub-configs included). No training here;
the model zoo (``test_callback_zoo.py``) trains with every callback.
"""

from __future__ import annotations

import inspect

import pytest
from _callback_configs import FAST_CONFIGS, measuring_callback_names

from lightning_optsurvey import callbacks as cbs

NAMES = measuring_callback_names()


def test_every_measuring_callback_has_a_fast_config():
    missing = sorted(set(NAMES) - set(FAST_CONFIGS))
    assert not missing, f"add a fast configuration of {missing} to tests/_callback_configs.py"
    assert set(FAST_CONFIGS) <= set(NAMES), "a fast configuration names a callback not in callbacks.__all__"


@pytest.mark.parametrize("name", NAMES)
def test_every_measuring_callback_survives_ddp_spawn_pickling(name):
    """ddp_spawn pickles the callbacks with torch.multiprocessing's pickler: each must come back equal, and
    any generator it keeps must continue the very same stream of draws (not restart, not be shared)."""
    import io
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing

    callback = FAST_CONFIGS[name]()
    generators = {k: v for k, v in vars(callback).items() if isinstance(v, torch.Generator)}
    for g in generators.values():
        torch.rand(5, generator=g)  # mid-stream, not at the seed
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(callback)
    copy = pickle.loads(buffer.getvalue())
    assert type(copy) is type(callback)
    assert copy.state_key == callback.state_key
    torch.testing.assert_close(copy.state_dict(), callback.state_dict(), rtol=0, atol=0)
    assert set(vars(copy)) == set(vars(callback))
    for key, g in generators.items():
        twin = getattr(copy, key)
        assert isinstance(twin, torch.Generator) and twin is not g
        assert torch.equal(torch.rand(7, generator=twin), torch.rand(7, generator=g))


@pytest.mark.parametrize("name", NAMES)
def test_arguments_follow_the_validation_rule(name):
    """Wrong type: TypeError; out of range: ValueError; each message names the parameter."""
    cls = getattr(cbs, name)
    params = inspect.signature(cls).parameters
    cases = []
    if "loss_fn" in params:
        cases.append(({"loss_fn": 3}, TypeError, "loss_fn"))
    for count in ("every_n_epochs", "every_n_steps", "num_batches"):
        if count in params:
            cases += [({count: 0}, ValueError, count), ({count: 1.5}, TypeError, count)]
    if "seed" in params:
        cases.append(({"seed": "0"}, TypeError, "seed"))
    if "at_fit_end" in params:
        cases.append(({"at_fit_end": "yes"}, TypeError, "at_fit_end"))
    assert cases, f"{name} takes none of the common arguments"
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            cls(**kwargs)


def test_a_yaml_config_builds_hessian_spectrum_with_typed_sub_configs(tmp_path):
    """LightningCLI (jsonargparse) reads TraceConfig/DensityConfig as nested mappings, and ``true`` as the defaults."""
    from lightning.pytorch.cli import LightningCLI

    from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  logger: false\n"
        "  callbacks:\n"
        "    - class_path: lightning_optsurvey.callbacks.HessianSpectrum\n"
        "      init_args:\n"
        "        top_k: 2\n"
        "        trace: {matvecs: 12, rtol: 0.2}\n"
        "        density: {probes: 1, steps: 5}\n"
        "        at_fit_end: true\n"
        "    - class_path: lightning_optsurvey.callbacks.HessianSpectrum\n"
        "      init_args:\n"
        "        trace: true\n"
        "    - class_path: lightning_optsurvey.callbacks.Sharpness\n"
        "      init_args:\n"
        "        kinds: [sam, keskar]\n"
    )
    cli = LightningCLI(ClassifierModule, DigitsDataModule, run=False, args=["--config", str(config)],
                       save_config_callback=None)
    first, second = (c for c in cli.trainer.callbacks if isinstance(c, cbs.HessianSpectrum))
    assert first.trace == cbs.TraceConfig(matvecs=12, rtol=0.2)
    assert first.density == cbs.DensityConfig(probes=1, steps=5)
    assert first.cadence.at_fit_end and first.top_k == 2
    assert second.trace == cbs.TraceConfig() and second.density is None
    (sharpness,) = (c for c in cli.trainer.callbacks if isinstance(c, cbs.Sharpness))
    assert sharpness.kinds == ("sam", "keskar")


def test_the_default_set_logs_what_compare_summarizes_at_the_last_step(tmp_path):
    """`optsurvey compare`'s summary reads the last value of each measured metric: the default set must log
    all of them after the final step (at_fit_end), the trace to its stated relative standard error."""
    from lightning.pytorch import Trainer

    from lightning_optsurvey.callbacks.defaults import TRACE_RTOL
    from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule

    made = cbs.default_callbacks()
    trainer = Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=3, limit_val_batches=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=list(made), default_root_dir=tmp_path)  # a copy: Lightning appends to it
    trainer.fit(ClassifierModule(model="cnn", optimizer="sgd"), datamodule=DigitsDataModule(batch_size=32))
    last = {k: v for cb in made for k, v in cb.history[-1].items()}
    assert all(cb.history[-1]["step"] == 3 for cb in made)
    for key in ("hessian/eig_1", "hessian/eig_2", "hessian/trace", "sharpness/sam", "gen_gap/loss", "gen_gap/acc"):
        assert key in last and key in trainer.callback_metrics, key
    assert last["hessian/eig_1"] >= last["hessian/eig_2"]
    stated = last["hessian/trace_stderr"] <= TRACE_RTOL * abs(last["hessian/trace"])
    assert stated or last["hessian/trace_matvecs"] >= 59
