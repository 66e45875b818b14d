"""The default task (scikit-learn's bundled 8x8 digits, small models, a classifier module) and label-skew.

:func:`partition_indices` and :class:`PartitionSampler` split any labelled data set over ranks.
"""

from lightning_optsurvey.tasks.classifier import ClassifierModule
from lightning_optsurvey.tasks.digits import DigitsDataModule
from lightning_optsurvey.tasks.models import available_models, build_model
from lightning_optsurvey.tasks.partition import PartitionSampler, partition_indices

__all__ = ["ClassifierModule", "DigitsDataModule", "PartitionSampler", "available_models", "build_model",
           "partition_indices"]
