"""Compare optimizers (and strategies) on your own model, one MLflow run each: ``optsurvey compare`` in Python.

    python examples/compare_optimizers.py                                   # sgd, adam, sam, kfac
    python examples/compare_optimizers.py --optimizers momentum,sam --strategies ddp,gossip_ring --devices 2

Every run trains the same model from the same initialization with one optimizer of our registry and the
same measuring callbacks, so the runs table of the MLflow UI lines up accuracy next to the Hessian's top
eigenvalue, SAM sharpness and the generalization gap. At the end the script asks MLflow for the best run
of this sweep and prints the command that opens the UI on the experiment.

With ``--devices N`` every run of the grid uses N processes on this machine: Lightning starts them at the
first run by re-running this script, and each process then walks the same grid.
"""

import argparse
import time

import lightning as L
import mlflow
from _digits import DigitsNet, shuffled_digits
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, TensorDataset

import lightning_optsurvey  # noqa: F401  (registers the strategy names)
from lightning_optsurvey.callbacks import GeneralizationGap, HessianSpectrum, OptimizerLoopAdapter, Sharpness
from lightning_optsurvey.optim import create_optimizer, get_spec
from lightning_optsurvey.tracking import ensure_experiment, ui_hint

EXPERIMENT = "compare-optimizers"


class DigitsClassifier(DigitsNet):
    """Your own model; the optimizer is chosen by registry name (``optsurvey list`` shows them)."""

    def __init__(self, optimizer: str = "sgd", optimizer_kwargs: dict | None = None, hidden: int = 64):
        super().__init__(hidden)
        # The registry's defaults with your overrides; saved hyperparameters become MLflow run parameters.
        kwargs = {**get_spec(optimizer).defaults, **(optimizer_kwargs or {})}
        self.save_hyperparameters({"optimizer": optimizer, "optimizer_kwargs": kwargs, "hidden": hidden})

    def configure_optimizers(self):
        # SAM-like methods evaluate Lightning's closure themselves; K-FAC needs the network for its hooks.
        spec = get_spec(self.hparams.optimizer)
        return create_optimizer(spec.name, self.parameters(), model=self if spec.needs_model else None,
                                **self.hparams.optimizer_kwargs)


def digits_loaders(batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    x, y = shuffled_digits()
    return (DataLoader(TensorDataset(x[:1400], y[:1400]), batch_size, shuffle=True),
            DataLoader(TensorDataset(x[1400:], y[1400:]), batch_size))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Compare optimizers on a user's own model as MLflow runs")
    parser.add_argument("--optimizers", default="sgd,adam,sam,kfac", help="comma-separated registry names")
    parser.add_argument("--strategies", default=None, help="comma-separated, e.g. ddp,gossip_ring (with --devices)")
    parser.add_argument("--devices", type=int, default=1, help="processes per run (CPU) or GPUs")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--limit-train-batches", type=int, default=None, help="for a quick smoke run")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    args = parser.parse_args()
    optimizers = args.optimizers.split(",")
    strategies = args.strategies.split(",") if args.strategies else ["ddp" if args.devices > 1 else "auto"]
    if args.devices > 1 and "auto" in strategies:
        parser.error("with --devices > 1 every run needs a multi-process strategy (ddp, gossip, local_sgd, ...)")

    # Create the experiment once (not in the re-run processes) and tag it so the UI opens on the runs table.
    if rank_zero_only.rank == 0:
        experiment_id = ensure_experiment(args.tracking_uri, EXPERIMENT)
    sweep = time.strftime("%Y%m%d-%H%M%S")  # a tag shared by the runs of this invocation
    train_loader, val_loader = digits_loaders()
    for strategy in strategies:
        for name in optimizers:
            L.seed_everything(0)  # the same initial weights and data order for every optimizer
            logger = MLFlowLogger(experiment_name=EXPERIMENT, run_name=f"{name}-{strategy}",
                                  tracking_uri=args.tracking_uri, tags={"sweep": sweep, "strategy": strategy})
            trainer = L.Trainer(
                accelerator=args.accelerator, devices=args.devices, strategy=strategy,
                max_epochs=args.max_epochs, limit_train_batches=args.limit_train_batches, logger=logger,
                # OptimizerLoopAdapter: what SAM, K-FAC, ... need from the loop (an installed package's entry
                # point attaches it by itself; here it is explicit so that the script also runs from a checkout).
                callbacks=[HessianSpectrum(top_k=1), Sharpness(kinds=("sam",)), GeneralizationGap(),
                           OptimizerLoopAdapter()],
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            )
            trainer.fit(DigitsClassifier(name), train_loader, val_loader)

    if trainer.is_global_zero:
        mlflow.set_tracking_uri(args.tracking_uri)
        runs = mlflow.search_runs(
            [experiment_id], filter_string=f"tags.sweep = '{sweep}'", order_by=["metrics.`val/acc` DESC"]
        )
        columns = ["tags.mlflow.runName", "metrics.val/acc", "metrics.val/loss", "metrics.hessian/eig_1",
                   "metrics.sharpness/sam", "metrics.gen_gap/loss"]
        table = runs[columns].rename(columns=lambda c: "run" if c.startswith("tags.") else c.split(".", 1)[1])
        print(table.to_string(index=False))
        best = runs.iloc[0]
        print(f"\nbest: {best['tags.mlflow.runName']} (run {best['run_id']}), val/acc={best['metrics.val/acc']:.4f}")
        command, address = ui_hint(args.tracking_uri, experiment_id)
        print(f"open the MLflow UI:  {command}\nthen browse:         {address}")
