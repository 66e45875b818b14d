"""Small models for the digits task, built by name.

All take 1x8x8 images. ``cnn`` is LeNet-style with about 49k parameters; ``cnn_bn`` adds BatchNorm
(the case that tests whether a measurement leaves running statistics alone); ``mlp_dropout`` adds
Dropout (the case that tests train/eval handling).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def _mlp(num_classes: int, dropout: float = 0.0, hidden: int = 128) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(64, hidden), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, num_classes))
    return nn.Sequential(*layers)


def _cnn(num_classes: int, batch_norm: bool = False) -> nn.Module:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=not batch_norm)
        return [conv, nn.BatchNorm2d(c_out), nn.ReLU()] if batch_norm else [conv, nn.ReLU()]

    return nn.Sequential(
        *block(1, 16),
        *block(16, 32),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "mlp": lambda n: _mlp(n),
    "mlp_dropout": lambda n: _mlp(n, dropout=0.2),
    "mlp_wide": lambda n: _mlp(n, hidden=1024),
    "cnn": lambda n: _cnn(n),
    "cnn_bn": lambda n: _cnn(n, batch_norm=True),
}


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(_BUILDERS)


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """Build a fresh model for 1x8x8 inputs.

    Args:
        name: One of :func:`available_models` (``"mlp"``, ``"mlp_dropout"``, ``"mlp_wide"``
            (~1.2M parameters, for benchmarks), ``"cnn"``, ``"cnn_bn"``).
        num_classes: Size of the output layer.

    Returns:
        A new ``nn.Module`` initialized from torch's global RNG.

    Raises:
        ValueError: If ``name`` is unknown or ``num_classes`` is not a positive integer.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(available_models())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return _BUILDERS[name](num_classes)
