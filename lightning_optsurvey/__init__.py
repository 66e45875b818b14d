"""lightning-optsurvey: the survey's optimizers, strategies and measures as PyTorch Lightning plugins.

Importing the package registers the strategy names (``Trainer(strategy="gossip")``); registration is
idempotent, so importing twice is harmless. Without Lightning installed, the pure-torch layers
(``validation``, ``optim``, ``curvature``, ``measures``) and the theory's maths still import.
"""

__version__ = "0.1.0"

try:
    from lightning_optsurvey import strategies as strategies
except ModuleNotFoundError as _err:  # Lightning is missing: nothing to register strategies in
    if (_err.name or "").split(".")[0] != "lightning":
        raise

__all__ = ["__version__", "strategies"]
