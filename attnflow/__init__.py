"""attnflow: how information flows through ViT self-attention, and how well tokens aggregate.

Public API (imported lazily, so ``import attnflow`` and the CLI start fast)::

    model = attnflow.load_model("mocov3-vit-b16", checkpoint="vit-b-300ep.pth.tar")
    result = attnflow.attention_stats(model, loader)
    df = result.to_frame()
"""

from __future__ import annotations

from ._lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "AttentionTap": "attnflow.tap",
    "UnsupportedModelError": "attnflow.vit",
    "attention_metrics": "attnflow.metrics",
    "METRICS": "attnflow.metrics",
    "StatsReducer": "attnflow.reducers",
    "LoopOptions": "attnflow.options",
    "attention_stats": "attnflow.stats",
    "Result": "attnflow.result",
    "load_model": "attnflow.models.load",
    "list_specs": "attnflow.models.registry",
    "get_spec": "attnflow.models.registry",
    "ModelSpec": "attnflow.models.registry",
    "ImageFolderDataset": "attnflow.data.images",
    "eval_transform": "attnflow.data.transforms",
    "AttnflowError": "attnflow.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return __all__
