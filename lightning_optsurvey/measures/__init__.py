"""Pure generalization measures over ``(model, loss_fn, batches)``; no Lightning import here.

Sharpness (SAM one-step, worst-case, average-case, Keskar, PAC-Bayes sigma), norm-based measures
(parameter, spectral, Frobenius, path, Fisher-Rao norms, distance from initialization), the gradient noise
scale and loss-landscape slices. None of them changes the model they measure.
"""

from lightning_optsurvey.measures._functional import FlatObjective, make_generator
from lightning_optsurvey.measures.landscape import (
    filter_normalized_direction,
    loss_surface,
    normalize_to_filters,
)
from lightning_optsurvey.measures.noise import NoiseScale, batch_gradients, gradient_noise_scale
from lightning_optsurvey.measures.norms import (
    distance_from_init,
    fisher_rao_norm,
    frobenius_norm_product,
    operator_spectral_norm,
    parameter_norm,
    path_norm,
    spectral_norm_product,
    weight_layers,
)
from lightning_optsurvey.measures.sharpness import (
    average_sharpness,
    keskar_sharpness,
    pac_bayes_sigma,
    sam_sharpness,
    worst_case_sharpness,
)

__all__ = [
    "FlatObjective",
    "NoiseScale",
    "average_sharpness",
    "batch_gradients",
    "distance_from_init",
    "filter_normalized_direction",
    "fisher_rao_norm",
    "frobenius_norm_product",
    "gradient_noise_scale",
    "keskar_sharpness",
    "loss_surface",
    "make_generator",
    "normalize_to_filters",
    "operator_spectral_norm",
    "pac_bayes_sigma",
    "parameter_norm",
    "path_norm",
    "sam_sharpness",
    "spectral_norm_product",
    "weight_layers",
    "worst_case_sharpness",
]
