"""Decentralized training of your own model: ``Trainer(strategy="gossip", devices=N)``.

Each of the N processes keeps its own copy of the model and steps on its own shard of the data; instead of
all-reducing gradients it then averages its parameters with its neighbours on a graph (D-PSGD). The
checkpoint holds the consensus model (the average over processes), an ordinary single-device checkpoint.

One machine, N CPU processes (the default) or N GPUs:

    python examples/gossip_training.py --devices 4 --topology ring
    python examples/gossip_training.py --accelerator gpu --devices 8 --topology one_peer_exponential

Several machines: run the same command on every node with the main node's address and the node's rank;
Lightning reads these variables and starts the ``--devices`` processes of its node itself:

    # on the main node, 10.0.0.1
    MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NODE_RANK=0 \
        python examples/gossip_training.py --accelerator gpu --devices 8 --num-nodes 2
    # on the second node
    MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NODE_RANK=1 \
        python examples/gossip_training.py --accelerator gpu --devices 8 --num-nodes 2

torchrun and SLURM start every process themselves; Lightning detects them and launches nothing:

    torchrun --nnodes 2 --nproc-per-node 8 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500 \
        examples/gossip_training.py --accelerator gpu --devices 8 --num-nodes 2
    srun --nodes 2 --ntasks-per-node 8 --gpus-per-node 8 \
        python examples/gossip_training.py --accelerator gpu --devices 8 --num-nodes 2

Keep such a file a plain script with ``if __name__ == "__main__":``: Lightning starts the other processes
of a node by running its command line again. The checkpoint directory must be on the main node (or shared),
since the main process evaluates the consensus model from it at the end.
"""

import argparse

import lightning as L
import torch
from _digits import DigitsNet, shuffled_digits
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from torch.utils.data import DataLoader, TensorDataset

import lightning_optsurvey  # noqa: F401  (registers "gossip", "gossip_ring", ... with Lightning)
from lightning_optsurvey.callbacks import ConsensusDistance
from lightning_optsurvey.strategies import TOPOLOGY_KINDS, GossipStrategy


class DigitsClassifier(DigitsNet):
    """Your own model; nothing in it knows about gossip."""

    def __init__(self, lr: float = 0.1, hidden: int = 64):
        super().__init__(hidden)
        self.save_hyperparameters()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def digits_loaders(batch_size: int = 32) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Train / validation / test loaders. Under a multi-process strategy Lightning shards them by rank."""
    x, y = shuffled_digits()
    sets = [TensorDataset(x[part], y[part]) for part in (slice(0, 1200), slice(1200, 1500), slice(1500, None))]
    return (DataLoader(sets[0], batch_size, shuffle=True), DataLoader(sets[1], batch_size),
            DataLoader(sets[2], batch_size))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Gossip (D-PSGD) training of a user's own LightningModule")
    parser.add_argument("--devices", type=int, default=4, help="processes (CPU) or GPUs per node")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--topology", default="exponential", choices=TOPOLOGY_KINDS)
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--limit-train-batches", type=int, default=None, help="for a quick smoke run")
    parser.add_argument("--checkpoint-dir", default="checkpoints/gossip")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    args = parser.parse_args()

    L.seed_everything(0)  # the same initial model on every process
    train_loader, val_loader, test_loader = digits_loaders()
    # strategy="gossip" is GossipStrategy(topology="exponential"); "gossip_ring" etc. name other graphs.
    # The object form takes the topology (and gossip_every, overlap, algorithm="push_sum") as arguments.
    strategy = "gossip" if args.topology == "exponential" else GossipStrategy(topology=args.topology)
    logger = MLFlowLogger(experiment_name="gossip-training", tracking_uri=args.tracking_uri)
    checkpoint = ModelCheckpoint(dirpath=args.checkpoint_dir, monitor="val/acc", mode="max")
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=strategy,
        max_epochs=args.max_epochs,
        limit_train_batches=args.limit_train_batches,
        logger=logger,  # rank 0 logs: topology, spectral_gap, comm/bytes_sent, gossip/consensus_distance
        callbacks=[ConsensusDistance(every_n_steps=5), checkpoint],
        log_every_n_steps=5,
        enable_progress_bar=False,
    )
    trainer.fit(DigitsClassifier(), train_loader, val_loader)

    if trainer.is_global_zero:
        if torch.distributed.is_initialized():  # training is over: what follows runs in this process only
            torch.distributed.destroy_process_group()
        # The consensus checkpoint loads like any other: one process, one device, no strategy.
        consensus = DigitsClassifier.load_from_checkpoint(checkpoint.best_model_path, map_location="cpu")
        # Log the test metrics into the same MLflow run as the training.
        same_run = MLFlowLogger(tracking_uri=args.tracking_uri, run_id=logger.run_id)
        evaluator = L.Trainer(accelerator="cpu", devices=1, logger=same_run, enable_progress_bar=False)
        (result,) = evaluator.test(consensus, test_loader, verbose=False)
        print(f"consensus model from {checkpoint.best_model_path}: test/acc={result['test/acc']:.4f}, "
              f"MLflow run {logger.run_id}")
