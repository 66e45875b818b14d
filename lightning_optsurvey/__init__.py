"""lightning-optsurvey: the survey's optimizers, strategies and measures as PyTorch Lightning plugins.

Importing the package registers the strategy names (``Trainer(strategy="gossip")``); registration is
idempotent, so importing twice is harmless.
"""

__version__ = "0.1.0"

from lightning_optsurvey import strategies as strategies

__all__ = ["__version__", "strategies"]
