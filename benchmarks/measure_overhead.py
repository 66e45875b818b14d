"""What measuring costs on the digits CNN: each callback per measurement, and compare's default set per run.

Two tables, from runs made side by side in one process (the runs alternate, so slow drifts of a shared
machine fall on all of them alike), CPU seconds of this process on one thread:

1. **Per callback**: each callback is attached to a training run of ``--epochs`` epochs and every call
   of its ``run_measurement`` is timed, in training (so warm starts act as they do in a real run). Its
   cost per measurement is given in gradient-equivalents (one gradient = forward and backward of the
   module on one training batch of ``--batch-size``, timed alongside) and as a percentage of one
   training epoch (the fit time of the run without measurement, divided by its epochs).
2. **Default set**: ``trainer.fit`` with ``optsurvey compare``'s default measuring callbacks
   (:func:`lightning_optsurvey.callbacks.default_callbacks`), with the set it replaced (top-2 + Hutch++
   trace every epoch, the generalization gap on the whole training set, SAM sharpness on 4 batches: the
   previous *configuration*, run on the current code, so its figure includes this code's speed-ups), and
   with none (``--no-measure``), each ratio the median over ``--repeats`` alternating repeats. The Trainer
   is built as ``optsurvey compare`` builds it (``DivergenceMonitor``, ``OptimizerLoopAdapter``,
   ``log_every_n_steps=10``), without a logger (the smallest base, so the strictest ratio) or, with
   ``--mlflow``, logging to MLflow on sqlite as ``compare`` does.

    python benchmarks/measure_overhead.py [--repeats 3] [--epochs 5] [--mlflow] [--write-readme]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from lightning_optsurvey.callbacks import (
    EdgeOfStability,
    GeneralizationGap,
    GeneralizationMeasures,
    GradientNoiseScale,
    HessianSpectrum,
    LossLandscape,
    MeasuringCallback,
    Sharpness,
    TraceConfig,
    default_callbacks,
    measuring,
)
from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule


def previous_default_set() -> list[MeasuringCallback]:
    """``optsurvey compare``'s measuring callbacks before issue 18, for the side-by-side ratio."""
    return [HessianSpectrum(top_k=2, trace=True), GeneralizationGap(), Sharpness(kinds=("sam",), rho=0.05)]


def single_callbacks() -> dict[str, Callable[[], MeasuringCallback]]:
    """Each callback alone, named as the table shows it."""
    return {
        "default: HessianSpectrum(top_k=2, trace=TraceConfig(rtol=0.1))": lambda: default_callbacks()[0],
        "default: GeneralizationGap(every_n_epochs=2, stderr=0.025)": lambda: default_callbacks()[1],
        "default: Sharpness(kinds=('sam',), num_batches=1, every_n_epochs=2)": lambda: default_callbacks()[2],
        "previous: HessianSpectrum(top_k=2, trace=True) (Hutch++, 60 products)": lambda: previous_default_set()[0],
        "previous: GeneralizationGap() (whole training set)": lambda: previous_default_set()[1],
        "previous: Sharpness(kinds=('sam',)) (4 batches)": lambda: previous_default_set()[2],
        "HessianSpectrum(top_k=2, trace=None)": lambda: HessianSpectrum(top_k=2),
        "HessianSpectrum(top_k=2, trace=TraceConfig(rtol=0.1), warm_start=False)":
            lambda: HessianSpectrum(top_k=2, trace=TraceConfig(rtol=0.1), warm_start=False),
        "Sharpness(kinds=('adaptive_worst_case',), steps=20)": lambda: Sharpness(kinds=("adaptive_worst_case",)),
        "Sharpness(kinds=('average',), num_samples=16)": lambda: Sharpness(kinds=("average",)),
        "Sharpness(kinds=('pac_bayes_sigma',))": lambda: Sharpness(kinds=("pac_bayes_sigma",)),
        "GradientNoiseScale()": lambda: GradientNoiseScale(),
        "EdgeOfStability()": lambda: EdgeOfStability(),
        "GeneralizationMeasures() (all six)": lambda: GeneralizationMeasures(),
        "LossLandscape('1d', resolution=25)": lambda: LossLandscape(kind="1d", resolution=25),
    }


def timed(callback: MeasuringCallback, seconds: list[float]) -> MeasuringCallback:
    """``callback`` with each ``run_measurement`` call's CPU seconds appended to ``seconds``."""
    inner = callback.run_measurement

    def run_measurement(trainer: Any, pl_module: Any) -> dict[str, float]:
        start = time.process_time()
        try:
            return inner(trainer, pl_module)
        finally:
            seconds.append(time.process_time() - start)

    callback.run_measurement = run_measurement  # type: ignore[method-assign]
    return callback


TRACKING_URI: str | None = None  # an sqlite URI: runs log to MLflow as `optsurvey compare` runs do


def fit(callbacks: list[Any], epochs: int, batch_size: int) -> tuple[float, ClassifierModule, Any]:
    """CPU seconds of ``trainer.fit`` on the digits CNN with ``callbacks``, built as ``compare`` builds it.

    With :data:`TRACKING_URI` set the run logs to MLflow; its run is created before the clock starts (as
    ``compare`` logs its hyperparameters before ``fit``), so only the logging during training is timed.
    """
    import lightning as L

    from lightning_optsurvey.callbacks import DivergenceMonitor, OptimizerLoopAdapter

    L.seed_everything(0, verbose=False)
    module = ClassifierModule(model="cnn", optimizer="sgd", optimizer_kwargs={"lr": 0.05, "momentum": 0.9})
    logger: Any = False
    if TRACKING_URI is not None:
        from lightning.pytorch.loggers import MLFlowLogger

        logger = MLFlowLogger(experiment_name="measure-overhead", tracking_uri=TRACKING_URI)
        logger.log_hyperparams({"epochs": epochs})
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10,
                        callbacks=[DivergenceMonitor(stop=False), *callbacks, OptimizerLoopAdapter()],
                        default_root_dir="/tmp/measure_overhead")
    data = DigitsDataModule(batch_size=batch_size)
    start = time.process_time()
    trainer.fit(module, datamodule=data)
    return time.process_time() - start, module, trainer


def gradient_seconds(module: ClassifierModule, batch_size: int, repeats: int = 20) -> float:
    """CPU seconds of one forward and backward pass of ``module`` on one training batch."""
    data = DigitsDataModule(batch_size=batch_size)
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    params = [p for p in module.parameters() if p.requires_grad]
    with measuring(module) as m:
        torch.autograd.grad(F.cross_entropy(m(x), y), params)  # warm-up
        start = time.process_time()
        for _ in range(repeats):
            torch.autograd.grad(F.cross_entropy(m(x), y), params)
        return (time.process_time() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--only-default", action="store_true", help="skip the per-callback table")
    parser.add_argument("--mlflow", action="store_true",
                        help="log every run to MLflow (sqlite in a temporary folder), as `optsurvey compare` does")
    parser.add_argument("--write-readme", action="store_true", help="write the tables into README.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

    if args.mlflow:
        import tempfile

        global TRACKING_URI
        TRACKING_URI = f"sqlite:///{tempfile.mkdtemp(prefix='measure_overhead_')}/mlflow.db"
    fit([], 1, args.batch_size)  # warm-up: imports, data, first-call costs (and the MLflow database)
    singles = {} if args.only_default else single_callbacks()
    base, default, previous, grads = [], [], [], []
    costs: dict[str, list[float]] = defaultdict(list)
    products: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.repeats):
        seconds, module, _ = fit([], args.epochs, args.batch_size)
        base.append(seconds)
        grads.append(gradient_seconds(module, args.batch_size))
        default.append(fit(default_callbacks(), args.epochs, args.batch_size)[0])
        previous.append(fit(previous_default_set(), args.epochs, args.batch_size)[0])
        for name, make in singles.items():
            spent: list[float] = []
            callback = timed(make(), spent)
            fit([callback], args.epochs, args.batch_size)
            costs[name].append(statistics.median(spent))
            products[name].extend(h["hessian/num_matvecs"] for h in callback.history if "hessian/num_matvecs" in h)

    epoch = statistics.median(base) / args.epochs
    grad = statistics.median(grads)
    lines = [f"Digits CNN ({sum(p.numel() for p in module.parameters())} parameters), {args.epochs} epochs of "
             f"{args.batch_size}-sample batches, SGD, {'MLflow logging (sqlite)' if args.mlflow else 'no logger'}; "
             f"CPU seconds on one thread, medians of {args.repeats} "
             f"alternating repeats. One epoch = {epoch:.3f} s, one gradient (one batch) = {grad * 1e3:.2f} ms.", ""]
    lines += ["| `optsurvey compare` measuring set | fit CPU seconds | ratio to `--no-measure` |",
              "|---|---:|---:|",
              f"| none (`--no-measure`) | {statistics.median(base):.2f} | 1.00x |",
              f"| default (`callbacks.default_callbacks()`) | {statistics.median(default):.2f} | "
              f"{statistics.median(d / b for d, b in zip(default, base)):.2f}x |",
              f"| previous default (before issue 18) | {statistics.median(previous):.2f} | "
              f"{statistics.median(p / b for p, b in zip(previous, base)):.2f}x |"]
    if singles:
        lines += ["", "| callback (one measurement, in training) | CPU ms | gradient-equivalents | % of an epoch "
                  "| Hessian-vector products |", "|---|---:|---:|---:|---:|"]
        for name in singles:
            cost = statistics.median(costs[name])
            hvps = f"{statistics.median(products[name]):.0f}" if products[name] else ""
            lines.append(f"| {name} | {cost * 1e3:.1f} | {cost / grad:.1f} | {100 * cost / epoch:.0f} % | {hvps} |")
    table = "\n".join(lines)
    print(table)
    if args.write_readme:
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _readme import write_block

        write_block("measure-overhead", table)


if __name__ == "__main__":
    main()
