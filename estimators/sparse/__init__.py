"""The sampled sparse hyperlayer (Bloem et al. 2018) as a library, usable without the harness.

``SparseLayer`` is the free-parameter layer; ``AdaptiveSparseLayer`` takes its parameters from a
source network per instance; ``SparseGlimpse`` reads glimpses; ``sparse_product`` is the
functional core (``estimators.sparse.functional`` states the conventions: index space, variances,
flattening, normalisation); ``estimators.sparse.pooled`` computes pooled normalisation over the
pairs within a cut-off, with the bound on what it neglects.
"""

from estimators.sparse.functional import (
    DEFAULT_TAIL,
    Normalise,
    PooledForm,
    SparseLayerError,
    default_region,
    duplicate_mask,
    flat_index,
    log_densities,
    rounded_product,
    sample_indices,
    samples_per_tuple,
    sparse_mv,
    sparse_product,
    transform_means,
    transform_sigmas,
    tuple_proportions,
    weight_shape,
)
from estimators.sparse.glimpse import SparseGlimpse, glimpse_means
from estimators.sparse.layer import AdaptiveSparseLayer, SparseLayer

__all__ = [
    "DEFAULT_TAIL",
    "AdaptiveSparseLayer",
    "Normalise",
    "PooledForm",
    "SparseGlimpse",
    "SparseLayer",
    "SparseLayerError",
    "default_region",
    "duplicate_mask",
    "flat_index",
    "glimpse_means",
    "log_densities",
    "rounded_product",
    "sample_indices",
    "samples_per_tuple",
    "sparse_mv",
    "sparse_product",
    "transform_means",
    "transform_sigmas",
    "tuple_proportions",
    "weight_shape",
]
