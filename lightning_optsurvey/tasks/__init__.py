"""The default task: scikit-learn's bundled 8x8 digits, small models, and a classifier module."""

from lightning_optsurvey.tasks.classifier import ClassifierModule
from lightning_optsurvey.tasks.digits import DigitsDataModule
from lightning_optsurvey.tasks.models import available_models, build_model

__all__ = ["ClassifierModule", "DigitsDataModule", "available_models", "build_model"]
