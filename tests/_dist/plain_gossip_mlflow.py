"""A plain user script: ``Trainer(devices=N, strategy="gossip_ring")`` with Lightning's own launcher.

Usage: ``python plain_gossip_mlflow.py TRACKING_URI OUT_DIR DEVICES``. Lightning re-executes this
script for ranks 1..N-1; rank 0 writes the MLflow run id and the model's byte size to OUT_DIR.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import MLFlowLogger

import lightning_optsurvey  # noqa: F401  (registers the strategy names)
from lightning_optsurvey.callbacks.consensus import ConsensusDistance
from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

if __name__ == "__main__":
    uri, out, devices = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    logger = MLFlowLogger(experiment_name="gossip_plain", tracking_uri=uri)
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="gossip_ring",
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=2,
        log_every_n_steps=1,
        logger=logger,
        callbacks=[ConsensusDistance(every_n_steps=2)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = ClassifierModule("mlp", optimizer="sgd", optimizer_kwargs={"lr": 0.1})
    trainer.fit(module, DigitsDataModule(batch_size=32))
    if trainer.is_global_zero:
        model_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        (out / "run.json").write_text(json.dumps({"run_id": logger.run_id, "model_bytes": model_bytes}))
