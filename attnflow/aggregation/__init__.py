"""Non-trainable token aggregation (paper Appendix C.2: Table 5 and Fig. 7).

A fixed aggregation vector ``w`` (``[n_patches]``, non-negative, sums to 1) turns an image's patch tokens ``x_i``
into one representation ``sum_i w_i x_i``. The package holds the sources and their paper names
(:mod:`~attnflow.aggregation.sources`), the vectors (:mod:`~attnflow.aggregation.vectors`), the forwards that give
them (:mod:`~attnflow.aggregation.capture`), the streaming statistics (:mod:`~attnflow.aggregation.statistics`)
and the dataset analysis (:mod:`~attnflow.aggregation.analysis`)::

    from attnflow.aggregation import aggregation_statistics, fixed_aggregation_features
    result = aggregation_statistics(mae, "/data/imagenet/val", reference=dino, reference_name="dino-vit-b16")
    features = fixed_aggregation_features(mae, images, "cls_mean")        # [B, D]
"""

from __future__ import annotations

from .._lazy import lazy_getattr

_EXPORTS: dict[str, str] = {
    "SOURCES": "attnflow.aggregation.sources",
    "AggregationError": "attnflow.aggregation.sources",
    "Source": "attnflow.aggregation.sources",
    "parse_source": "attnflow.aggregation.sources",
    "source_label": "attnflow.aggregation.sources",
    "aggregation_vectors": "attnflow.aggregation.vectors",
    "aggregate_tokens": "attnflow.aggregation.vectors",
    "head_vectors": "attnflow.aggregation.vectors",
    "AggregationCapture": "attnflow.aggregation.capture",
    "FixedAggregationEncoder": "attnflow.aggregation.capture",
    "fixed_aggregation_features": "attnflow.aggregation.capture",
    "AggregationStats": "attnflow.aggregation.statistics",
    "pairwise_kl": "attnflow.aggregation.statistics",
    "kld_matrix": "attnflow.aggregation.statistics",
    "AggregationResult": "attnflow.aggregation.analysis",
    "aggregation_statistics": "attnflow.aggregation.analysis",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return __all__
