"""A zoo of small user LightningModules, written the way users write them (not through ClassifierModule).

Each entry is tiny enough for CPU tests and exercises one thing the measuring callbacks must handle:

- ``gpt``: a two-block GPT with tied embeddings, LayerNorm, causal ``nn.MultiheadAttention`` (SDPA path,
  ``need_weights=False``) with dropout, token-level cross-entropy as ``self.loss_fn`` on ``(tokens,
  next_tokens)`` batches: outputs ``(B, T, V)``, targets ``(B, T)``.
- ``resnet``: a residual CNN with BatchNorm.
- ``lstm``: a sequence classifier over an ``nn.LSTM``.
- ``dict``: dict batches ``{"x", "extra", "label"}`` and a ``compute_loss(batch)``, with
  ``example_input_array`` for the measures that run the model on an input.
- ``multi_input``: ``((x1, x2), y)`` batches and ``forward(x1, x2)``.

Determinism for resume checks: loaders do not shuffle (and have their own generators) and the modules
reseed the global RNG (Dropout's source) at every epoch start, so a run resumed from a checkpoint sees the
same masks as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

ZOO = ("gpt", "resnet", "lstm", "dict", "multi_input")


class _ZooModule(LightningModule):
    """Shared training loop: SGD with momentum, per-epoch reseeding, ``train/loss`` and ``val/loss``."""

    def __init__(self) -> None:
        super().__init__()

    def loss_of(self, batch: Any) -> Tensor:
        inputs, targets = batch
        args = inputs if isinstance(inputs, tuple | list) else (inputs,)
        return self.loss_fn(self(*args), targets)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.loss_of(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", self.loss_of(batch))

    def on_train_epoch_start(self) -> None:
        torch.manual_seed(1000 + self.current_epoch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


# -- GPT ---------------------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)  # True: not attended
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False, is_causal=True)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(_ZooModule):
    """Token-level language model; the LM head is tied to the token embedding."""

    def __init__(self, vocab: int = 11, d: int = 8, heads: int = 2, blocks: int = 2, context: int = 6,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(context, d))
        self.blocks = nn.ModuleList(_Block(d, heads, dropout) for _ in range(blocks))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.tok(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    @staticmethod
    def loss_fn(logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def gpt_data(n: int, vocab: int = 11, context: int = 6, seed: int = 0) -> TensorDataset:
    """Sequences of a noisy counter mod ``vocab``: learnable, next-token targets."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(vocab, (n, 1), generator=g)
    seq = (start + torch.arange(context + 1)) % vocab
    flip = torch.rand(n, context + 1, generator=g) < 0.1
    seq = torch.where(flip, torch.randint(vocab, seq.shape, generator=g), seq)
    return TensorDataset(seq[:, :-1], seq[:, 1:])


# -- ResNet with BatchNorm ---------------------------------------------------------------------------------
class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyResNet(_ZooModule):
    def __init__(self, channels: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU())
        self.block = _Residual(channels)
        self.fc = nn.Linear(channels, classes)
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.block(self.stem(x)).mean(dim=(2, 3)))


def image_data(n: int, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    x = torch.randn(n, 1, 5, 5, generator=g) + y.view(-1, 1, 1, 1).float()
    return TensorDataset(x, y)


# -- LSTM ----------------------------------------------------------------------------------------------------
class TinyLSTM(_ZooModule):
    def __init__(self, features: int = 3, hidden: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])

    def loss_fn(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets)


def sequence_data(n: int, features: int = 3, length: int = 4, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    x = torch.randn(n, length, features, generator=g) + 0.5 * y.view(-1, 1, 1).float()
    return TensorDataset(x, y)


# -- dict batches with compute_loss ----------------------------------------------------------------------
class _ThreeClasses(Dataset):
    """``n`` samples of 3 classes: a label, ``dim`` features shifted by it and 2 unshifted extra features."""

    def __init__(self, n: int, seed: int = 0, dim: int = 4) -> None:
        g = torch.Generator().manual_seed(seed)
        self.label = torch.randint(3, (n,), generator=g)
        self.x = torch.randn(n, dim, generator=g) + self.label.view(-1, 1).float()
        self.extra = torch.randn(n, 2, generator=g)

    def __len__(self) -> int:
        return len(self.label)


class DictDataset(_ThreeClasses):
    """Samples are dicts, as Hugging Face-style pipelines produce; default_collate makes dict batches."""

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.x[i], "extra": self.extra[i], "label": self.label[i]}


class DictModule(_ZooModule):
    """The loss lives in the module and reads a dict: ``compute_loss(batch)``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.1))
        self.side = nn.Linear(2, 6, bias=False)
        self.out = nn.Linear(6, 3)
        self.example_input_array = (torch.zeros(2, 4), torch.zeros(2, 2))

    def forward(self, x: Tensor, extra: Tensor) -> Tensor:
        return self.out(self.body(x) + self.side(extra))

    def compute_loss(self, batch: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(self(batch["x"], batch["extra"]), batch["label"])

    def loss_of(self, batch: Any) -> Tensor:
        return self.compute_loss(batch)


# -- several inputs ----------------------------------------------------------------------------------------
class MultiInput(_ZooModule):
    """Called as ``module(x1, x2)``; batches are ``((x1, x2), y)``; the loss is ``self.loss_fn``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.b = nn.Linear(2, 5)
        self.head = nn.Linear(5, 3)
        self.loss_fn = F.cross_entropy

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        return self.head(torch.relu(self.a(x1)) * torch.sigmoid(self.b(x2)))


class _PairsOfInputs(_ThreeClasses):
    """Samples ``((x1, x2), y)`` for :class:`MultiInput`: 3 shifted features and 2 extra ones."""

    def __init__(self, n: int, seed: int = 0) -> None:
        super().__init__(n, seed, dim=3)

    def __getitem__(self, i: int) -> tuple[tuple[Tensor, Tensor], Tensor]:
        return (self.x[i], self.extra[i]), self.label[i]


# -- the registry ------------------------------------------------------------------------------------------
class ZooData(LightningDataModule):
    def __init__(self, train: Dataset, val: Dataset, batch_size: int = 8) -> None:
        super().__init__()
        self.train, self.val, self.batch_size = train, val, batch_size

    # Own generators: a DataLoader iterator draws its base seed from the global RNG otherwise, at a point
    # of the epoch that differs between an uninterrupted and a resumed run.
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=False, generator=torch.Generator())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size, shuffle=False, generator=torch.Generator())


_FACTORIES: dict[str, tuple[Callable[[], LightningModule], Callable[[int, int], Dataset]]] = {
    "gpt": (TinyGPT, lambda n, seed: gpt_data(n, seed=seed)),
    "resnet": (TinyResNet, lambda n, seed: image_data(n, seed=seed)),
    "lstm": (TinyLSTM, lambda n, seed: sequence_data(n, seed=seed)),
    "dict": (DictModule, lambda n, seed: DictDataset(n, seed=seed)),
    "multi_input": (MultiInput, lambda n, seed: _PairsOfInputs(n, seed=seed)),
}


def make(name: str, seed: int = 0, n_train: int = 16, n_val: int = 8,
         batch_size: int = 8) -> tuple[LightningModule, ZooData]:
    """The zoo module ``name`` (weights from ``seed``) and its data (train and validation sets)."""
    module_cls, data = _FACTORIES[name]
    torch.manual_seed(seed)
    return module_cls(), ZooData(data(n_train, 1), data(n_val, 2), batch_size)
