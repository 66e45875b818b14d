"""Cost of one measurement of each issue-4 callback on the digits CNN, in seconds and gradient-equivalents.

The anchor, measured side by side in the same run, is one forward+backward pass (a gradient) of the
module over the same measurement subset (``--num-batches`` batches of ``--batch-size``), timed the
same way. ``GeneralizationGap`` evaluates the whole training set and the validation set, so its
figure is relative to the same anchor, not to its own data size.

    .venv/bin/python benchmarks/measure_overhead.py [--repeats 5] [--num-batches 4] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer

from lightning_optsurvey.callbacks import (
    EdgeOfStability,
    GeneralizationGap,
    GeneralizationMeasures,
    GradientNoiseScale,
    LossLandscape,
    Sharpness,
)
from lightning_optsurvey.callbacks._measure import measuring
from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule


def callbacks(nb: int) -> dict[str, object]:
    return {
        "Sharpness(kinds=('sam',))": Sharpness(kinds=("sam",), num_batches=nb),
        "Sharpness(kinds=('adaptive_worst_case',), steps=20)": Sharpness(kinds=("adaptive_worst_case",),
                                                                          num_batches=nb),
        "Sharpness(kinds=('average',), num_samples=16)": Sharpness(kinds=("average",), num_batches=nb),
        "Sharpness(kinds=('keskar',), steps=20)": Sharpness(kinds=("keskar",), num_batches=nb),
        "Sharpness(kinds=('pac_bayes_sigma',), num_samples=16)": Sharpness(kinds=("pac_bayes_sigma",),
                                                                            num_batches=nb),
        "GeneralizationGap() (whole train + val sets)": GeneralizationGap(),
        f"GradientNoiseScale(num_batches={nb})": GradientNoiseScale(num_batches=nb),
        "EdgeOfStability(tol=1e-3)": EdgeOfStability(num_batches=nb),
        "GeneralizationMeasures() (all six)": GeneralizationMeasures(num_batches=nb),
        "LossLandscape('1d', resolution=25)": LossLandscape(kind="1d", resolution=25, num_batches=nb),
    }


def paired_times(fn, anchor, repeats: int) -> tuple[float, float]:
    """Median CPU seconds of ``fn`` and median ratio to ``anchor``, the two timed alternately.

    CPU time of this process (one thread) rather than wall time: the benchmark machine is shared, and
    alternating the two keeps slow drifts out of the ratio.
    """
    fn(), anchor()  # warm-up
    seconds, ratios = [], []
    for _ in range(repeats):
        start = time.process_time()
        anchor()
        base = time.process_time() - start
        start = time.process_time()
        fn()
        took = time.process_time() - start
        seconds.append(took)
        ratios.append(took / base)
    return statistics.median(seconds), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    cbs = callbacks(args.num_batches)
    torch.manual_seed(0)
    module = ClassifierModule(model="cnn", optimizer="sgd", optimizer_kwargs={"lr": 0.05, "momentum": 0.9})
    trainer = Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=5, limit_val_batches=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=list(cbs.values()), default_root_dir="/tmp/measure_overhead")
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=args.batch_size))

    anchor_batches = next(iter(cbs.values()))._batches

    def gradient() -> None:
        with measuring(module) as m:
            m.eval()
            loss = sum(F.cross_entropy(m(x), y) * len(y) for x, y in anchor_batches)
            torch.autograd.grad(loss, [p for p in m.parameters() if p.requires_grad])

    rows = []
    for name, cb in cbs.items():
        seconds, ratio = paired_times(lambda cb=cb: cb.run_measurement(trainer, module), gradient, args.repeats)
        rows.append((name, seconds, ratio))
    anchor, _ = paired_times(gradient, gradient, args.repeats)
    n_params = sum(p.numel() for p in module.parameters())
    print(f"digits CNN ({n_params} parameters), measurement subset {args.num_batches} x {args.batch_size} "
          f"samples, 1 CPU thread, CPU seconds, median of {args.repeats}; anchor: 1 gradient = {anchor:.4f} s\n")
    print("| callback | CPU seconds / measurement | gradient-equivalents |")
    print("|---|---:|---:|")
    for name, seconds, ratio in rows:
        print(f"| {name} | {seconds:.4f} | {ratio:.1f} |")


if __name__ == "__main__":
    main()
