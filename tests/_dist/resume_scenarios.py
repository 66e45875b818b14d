"""One rank of the 2-process exact-resume check (gloo) for ``tests/test_resume.py``.

Usage: ``python resume_scenarios.py OUT_DIR [STRATEGY] [MODEL] [OPTIMIZER]`` under
``tests/_dist/launch.py`` (defaults: ``ddp``, ``mlp_dropout``, ``momentum``). Trains the digits classifier
for two epochs saving a mid-epoch and an epoch-end checkpoint, resumes a fresh Trainer from each, and saves
``OUT_DIR/result_rank<r>.pt`` with the runs' final parameters and buffers and the batches each saw on
this rank.
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

import lightning_optsurvey  # noqa: F401  (registers the strategy names)
from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
OUT = Path(sys.argv[1])
STRATEGY, MODEL, OPTIMIZER = (sys.argv[2:] + ["ddp", "mlp_dropout", "momentum"][len(sys.argv[2:]):])[:3]
RANK = int(os.environ["LOCAL_RANK"])


class BatchRecorder(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, tuple[int, ...]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((trainer.current_epoch, tuple(batch[1][:16].tolist())))


def fit(ckpt_path: str | None = None) -> tuple[dict[str, torch.Tensor], list]:
    torch.manual_seed(0)
    module = ClassifierModule(model=MODEL, optimizer=OPTIMIZER)
    recorder = BatchRecorder()
    callbacks = [recorder]
    if ckpt_path is None:
        callbacks.append(ModelCheckpoint(dirpath=OUT / "ckpt", filename="{step}", every_n_train_steps=7,
                                         save_top_k=-1))
        callbacks.append(ModelCheckpoint(dirpath=OUT / "ckpt", filename="{epoch}", every_n_epochs=1,
                                         save_top_k=-1))
    trainer = Trainer(accelerator="cpu", devices=2, strategy=STRATEGY, max_epochs=2, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=callbacks, limit_val_batches=2, default_root_dir=OUT)
    # 1,077 training images over 2 ranks: 539 each, 5 batches of 128 per epoch; step 7 is mid-epoch 1
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=128, seed=5), ckpt_path=ckpt_path)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, recorder.seen


straight, straight_batches = fit()
results = {"straight": straight, "straight_batches": straight_batches}
for label, name, done in (("mid_epoch", "step=7.ckpt", 7), ("epoch_end", "epoch=0.ckpt", 5)):
    state, batches = fit(str(OUT / "ckpt" / name))
    results[label] = {"state": state, "batches": batches, "done": done}
torch.save(results, OUT / f"result_rank{RANK}.pt")
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
