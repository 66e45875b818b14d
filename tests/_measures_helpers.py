"""Shared models for the measures tests: a quadratic with a known Hessian and small ReLU networks."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Quadratic(nn.Module):
    """L(w) = 1/2 (w - c)^T A (w - c), the same value for every sample of a batch."""

    def __init__(self, a: Tensor, w0: Tensor, center: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("center", torch.zeros_like(w0) if center is None else center)
        self.w = nn.Parameter(w0.clone())

    def forward(self, x: Tensor) -> Tensor:
        d = self.w - self.center
        return (0.5 * d @ self.a @ d).expand(x.shape[0])


def mean_output(outputs: Tensor, targets: Tensor) -> Tensor:
    return outputs.mean()


def dummy_batches(n: int = 4, dtype: torch.dtype = torch.float64) -> list[tuple[Tensor, Tensor]]:
    return [(torch.zeros(n, 1, dtype=dtype), torch.zeros(n, dtype=dtype))]


def spd_matrix(eigenvalues: list[float], seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def relu_mlp(bias: bool = True, seed: int = 0, sizes: tuple[int, ...] = (6, 10, 8, 4)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).double()


def classification_batches(
    n: int = 24, d: int = 6, classes: int = 4, num_batches: int = 2, seed: int = 1
) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(classes, (n,), generator=g))
        for _ in range(num_batches)
    ]


cross_entropy = F.cross_entropy
