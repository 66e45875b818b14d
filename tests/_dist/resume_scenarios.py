"""One rank of the 2-process exact-resume check (DDP over gloo) for ``tests/test_resume.py``.

Usage: ``python resume_scenarios.py OUT_DIR`` under ``tests/_dist/launch.py``. Trains the digits
classifier for two epochs saving a mid-epoch checkpoint, resumes a second Trainer from it, and saves
``OUT_DIR/result_rank<r>.pt`` with both runs' final parameters and the batches each saw on this rank.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
OUT = Path(sys.argv[1])
RANK = int(os.environ["LOCAL_RANK"])


class BatchRecorder(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, tuple[int, ...]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((trainer.current_epoch, tuple(batch[1][:16].tolist())))


def fit(ckpt_path: str | None = None) -> tuple[dict[str, torch.Tensor], list]:
    torch.manual_seed(0)
    module = ClassifierModule(model="mlp", optimizer="sgd", optimizer_kwargs={"lr": 0.05, "momentum": 0.9})
    recorder = BatchRecorder()
    callbacks = [recorder]
    if ckpt_path is None:
        callbacks.append(ModelCheckpoint(dirpath=OUT / "ckpt", filename="{step}", every_n_train_steps=7,
                                         save_top_k=-1))
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=callbacks)
    # 1,077 training images over 2 ranks: 539 each, 5 batches of 128 per epoch; step 7 is mid-epoch 1
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=128, seed=5), ckpt_path=ckpt_path)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, recorder.seen


straight, straight_batches = fit()
resumed, resumed_batches = fit(str(OUT / "ckpt" / "step=7.ckpt"))
torch.save({"straight": straight, "resumed": resumed, "straight_batches": straight_batches,
            "resumed_batches": resumed_batches, "done": 7}, OUT / f"result_rank{RANK}.pt")
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
