r"""Compressors for communication-efficient gossip (CHOCO-SGD): what a rank actually sends.

A :class:`Compressor` turns a flat tensor ``x`` (``n`` elements) into a *payload*: a list of tensors of
fixed shapes and dtypes (values, int32 indices, packed sign bits, a norm), which is exactly what
``torch.distributed`` sends, so ``comm/bytes_sent`` counts the payload's bytes. :meth:`Compressor.decompress`
rebuilds the dense tensor :math:`C(x)`. Every compressor states its contraction quality
:meth:`Compressor.delta`: :math:`\mathbb E\lVert C(x) - x\rVert^2 \le (1 - \delta)\lVert x\rVert^2`
(Koloskova, Stich & Jaggi 2019, Assumption 1), the quantity CHOCO-SGD's rate depends on.

- :class:`TopK` (``"topk"``): the ``k = max(1, round(ratio n))`` largest magnitudes, values + int32
  indices; :math:`\delta = k/n` (deterministic).
- :class:`RandomK` (``"randomk"``): ``k`` coordinates drawn uniformly without replacement, values +
  indices; :math:`\mathbb E\lVert C(x) - x\rVert^2 = (1 - k/n)\lVert x\rVert^2`. ``unbiased=True``
  rescales by ``n/k`` (:math:`\mathbb E C(x) = x`, variance :math:`(n/k - 1)\lVert x\rVert^2`), which
  is not a contraction.
- :class:`QSGD` (``"qsgd"``): stochastic rounding of :math:`s |x_i| / \lVert x\rVert_2` to ``levels``
  ``s`` levels (Alistarh et al. 2017), sent as one int8 per element plus the norm. The raw quantizer
  is unbiased with :math:`\mathbb E\lVert Q(x) - x\rVert^2 \le \omega\lVert x\rVert^2`,
  :math:`\omega = \min(n/s^2, \sqrt n/s)`; by default it is divided by :math:`\tau = 1 + \omega`,
  which makes it a contraction with :math:`\delta = 1/\tau` (CHOCO's Section 3 example).
- :class:`Sign` (``"sign"``): :math:`\lVert x\rVert_1 / n \cdot \mathrm{sign}(x)` (Karimireddy et al.
  2019), one bit per element packed into uint8 plus the scale;
  :math:`\lVert C(x) - x\rVert^2 = (1 - \lVert x\rVert_1^2 / (n\lVert x\rVert_2^2))\lVert x\rVert^2`,
  so :math:`\delta \ge 1/n`.

Users extend the set by subclassing :class:`Compressor` (four methods) and passing an instance as
``GossipStrategy(algorithm="choco", compressor=MyCompressor())``.

Why our own: ``torch.distributed.algorithms.ddp_comm_hooks`` compresses only DDP's all-reduce
(PowerSGD, fp16), and its payloads are dense; the CHOCO reference code (epfml/ChocoSGD) is a research
snapshot with no packing, so its byte counts are nominal.

References:
    Koloskova, Stich & Jaggi, "Decentralized Stochastic Optimization and Gossip Algorithms with
    Compressed Communication", ICML 2019, arXiv:1902.00340. Alistarh et al., "QSGD:
    Communication-Efficient SGD via Gradient Quantization and Encoding", NeurIPS 2017,
    arXiv:1610.02132. Karimireddy et al., "Error Feedback Fixes SignSGD and other Gradient Compression
    Schemes", ICML 2019, arXiv:1901.09847. Stich, Cordonnier & Jaggi, "Sparsified SGD with Memory",
    NeurIPS 2018, arXiv:1809.07599.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import Tensor

from lightning_optsurvey.validation import check_bool, check_choice, check_float, check_int, check_type

__all__ = ["COMPRESSORS", "QSGD", "Compressor", "RandomK", "Sign", "TopK", "make_compressor"]

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


class Compressor(abc.ABC):
    """A compression operator for flat tensors, with a fixed-size payload.

    Subclasses implement :meth:`payload_like`, :meth:`compress`, :meth:`decompress` and :meth:`delta`.
    The payload's shapes and dtypes may depend only on ``numel``, ``dtype`` and ``device`` (the
    receiver allocates it before the message arrives).
    """

    name: str = "compressor"

    @abc.abstractmethod
    def payload_like(self, numel: int, dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        """Uninitialized tensors with the payload's shapes and dtypes (receive buffers)."""

    @abc.abstractmethod
    def compress(self, x: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        """The payload for the 1-D tensor ``x`` (``generator`` for the random compressors)."""

    @abc.abstractmethod
    def decompress(self, payload: list[Tensor], numel: int, dtype: torch.dtype) -> Tensor:
        """The dense :math:`C(x)` (1-D, ``numel`` elements, ``dtype``) that ``payload`` encodes."""

    @abc.abstractmethod
    def delta(self, numel: int) -> float:
        r"""The contraction quality :math:`\delta` for tensors of ``numel`` elements.

        :math:`\mathbb E\lVert C(x) - x\rVert^2 \le (1-\delta)\lVert x\rVert^2` for every such ``x``; 0 if the
        operator is not a contraction.
        """

    def payload_bytes(self, numel: int, dtype: torch.dtype) -> int:
        """Bytes of one payload for a tensor of ``numel`` elements."""
        return sum(t.numel() * t.element_size() for t in self.payload_like(numel, dtype, torch.device("cpu")))

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """:math:`C(x)`: compress then decompress (what the receiver reconstructs)."""
        return self.decompress(self.compress(x, generator), x.numel(), x.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class TopK(Compressor):
    """Keep the ``k = max(1, round(ratio * n))`` entries of largest magnitude; send values and indices."""

    name = "topk"

    def __init__(self, ratio: float = 0.01) -> None:
        self.ratio = check_float("ratio", ratio, low=0.0, high=1.0, low_open=True)

    def k(self, numel: int) -> int:
        """Coordinates kept out of ``numel``."""
        return min(numel, max(1, round(self.ratio * numel)))

    def payload_like(self, numel: int, dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        k = self.k(numel)
        return [torch.empty(k, dtype=dtype, device=device), torch.empty(k, dtype=_index_dtype(numel), device=device)]

    def _indices(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.topk(x.abs(), self.k(x.numel()), sorted=False).indices

    def compress(self, x: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        indices = self._indices(x, generator)
        return [x[indices], indices.to(_index_dtype(x.numel()))]

    def decompress(self, payload: list[Tensor], numel: int, dtype: torch.dtype) -> Tensor:
        values, indices = payload
        return torch.zeros(numel, dtype=dtype, device=values.device).index_copy_(0, indices.long(), values.to(dtype))

    def delta(self, numel: int) -> float:
        return self.k(numel) / numel

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio})"


class RandomK(TopK):
    """Keep ``k`` uniformly random coordinates (values and indices sent); ``unbiased`` rescales by ``n/k``."""

    name = "randomk"

    def __init__(self, ratio: float = 0.01, unbiased: bool = False) -> None:
        super().__init__(ratio)
        self.unbiased = check_bool("unbiased", unbiased)

    def _indices(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.randperm(x.numel(), generator=generator, device=x.device)[: self.k(x.numel())]

    def compress(self, x: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        values, indices = super().compress(x, generator)
        if self.unbiased:
            values = values * (x.numel() / self.k(x.numel()))
        return [values, indices]

    def delta(self, numel: int) -> float:
        return 0.0 if self.unbiased and self.k(numel) < numel else self.k(numel) / numel

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio}, unbiased={self.unbiased})"


class QSGD(Compressor):
    r"""QSGD with ``levels`` levels: signed int8 levels plus the norm; divided by :math:`1 + \omega` unless unbiased."""

    name = "qsgd"

    def __init__(self, levels: int = 16, unbiased: bool = False) -> None:
        self.levels = check_int("levels", levels, low=1, high=127)  # sent as int8
        self.unbiased = check_bool("unbiased", unbiased)

    def omega(self, numel: int) -> float:
        r"""The variance factor :math:`\omega = \min(n/s^2, \sqrt n / s)` of the raw quantizer."""
        return min(numel / self.levels**2, math.sqrt(numel) / self.levels)

    def payload_like(self, numel: int, dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        return [torch.empty(1, dtype=torch.float32 if dtype != torch.float64 else dtype, device=device),
                torch.empty(numel, dtype=torch.int8, device=device)]

    def compress(self, x: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        norm_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        norm = torch.linalg.vector_norm(x.to(norm_dtype)).reshape(1)
        if float(norm) == 0.0:
            return [norm, torch.zeros(x.numel(), dtype=torch.int8, device=x.device)]
        scaled = x.abs().to(norm_dtype) * (self.levels / norm)
        lower = scaled.floor()
        uniform = torch.rand(x.numel(), generator=generator, device=x.device, dtype=norm_dtype)
        level = lower + (uniform < scaled - lower).to(norm_dtype)
        return [norm, (torch.sign(x).to(norm_dtype) * level).to(torch.int8)]

    def decompress(self, payload: list[Tensor], numel: int, dtype: torch.dtype) -> Tensor:
        norm, level = payload
        scale = norm / self.levels
        if not self.unbiased:
            scale = scale / (1.0 + self.omega(numel))
        return (level.to(norm.dtype) * scale).to(dtype)

    def delta(self, numel: int) -> float:
        return 0.0 if self.unbiased else 1.0 / (1.0 + self.omega(numel))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(levels={self.levels}, unbiased={self.unbiased})"


class Sign(Compressor):
    r"""Scaled sign :math:`\lVert x\rVert_1/n \cdot \mathrm{sign}(x)`: one bit per element, packed, plus the scale."""

    name = "sign"

    def payload_like(self, numel: int, dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        packed = torch.empty(-(-numel // 8), dtype=torch.uint8, device=device)
        return [torch.empty(1, dtype=dtype, device=device), packed]

    def compress(self, x: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        scale = (x.abs().sum() / x.numel()).reshape(1)
        bits = torch.zeros(-(-x.numel() // 8) * 8, dtype=torch.uint8, device=x.device)
        bits[: x.numel()] = (x >= 0).to(torch.uint8)
        packed = (bits.view(-1, 8) * _BITS.to(x.device)).sum(1, dtype=torch.uint8)
        return [scale, packed]

    def decompress(self, payload: list[Tensor], numel: int, dtype: torch.dtype) -> Tensor:
        scale, packed = payload
        bits = (packed[:, None] & _BITS.to(packed.device)) != 0
        signs = bits.reshape(-1)[:numel].to(dtype) * 2 - 1
        return signs * scale.to(dtype)

    def delta(self, numel: int) -> float:
        return 1.0 / numel


COMPRESSORS: dict[str, type[Compressor]] = {"topk": TopK, "randomk": RandomK, "qsgd": QSGD, "sign": Sign}
"""Compressors by name (``GossipStrategy(compressor=...)``)."""


def make_compressor(spec: str | Compressor, ratio: float = 0.01) -> Compressor:
    """A :class:`Compressor` from a name (``ratio`` for ``"topk"``/``"randomk"``) or an instance.

    Raises:
        ValueError: For an unknown name (the message lists the known ones) or a bad ``ratio``.
        TypeError: If ``spec`` is neither a string nor a :class:`Compressor`.
    """
    if isinstance(spec, Compressor):
        return spec
    check_type("compressor", spec, str, "a name or a Compressor")
    check_choice("compressor", spec, COMPRESSORS)
    check_float("ratio", ratio, low=0.0, high=1.0, low_open=True)
    return COMPRESSORS[spec](ratio) if spec in ("topk", "randomk") else COMPRESSORS[spec]()
