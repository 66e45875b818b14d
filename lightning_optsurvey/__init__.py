"""lightning-optsurvey: the survey's optimizers, strategies and measures as PyTorch Lightning plugins.

Importing the package registers the strategy names (``Trainer(strategy="gossip")``); registration is
idempotent, so importing twice is harmless. Without Lightning installed, the pure-torch parts (``optim``,
``curvature``, ``measures``, ``averaging`` and the maths of ``theory``) still import; only the Lightning
adapters are missing.
"""

__version__ = "0.1.0"

try:
    from lightning_optsurvey import strategies as strategies
except ModuleNotFoundError as error:  # Lightning is not installed: nothing to register the strategies with
    if (error.name or "").partition(".")[0] not in ("lightning", "lightning_fabric", "pytorch_lightning"):
        raise

__all__ = ["__version__", "strategies"]
