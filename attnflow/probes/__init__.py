"""Trainable probes on frozen ViT tokens: [cls], average pooling, AbMILP Selective Aggregation, attentive probing.

Public API (imported lazily)::

    from attnflow.probes import fit_heads, load_head
    df = fit_heads(train=(tokens, labels), val=(val_tokens, val_labels), heads=["cls", "avg", "abmilp"],
                   epochs=90, batch_size=1024)
    scores = load_head("runs/probe-mae/seed0/heads/abmilp.pt").scores(tokens)   # [n, 1 + N]
"""

from __future__ import annotations

from .._lazy import lazy_getattr

_EXPORTS: dict[str, str] = {
    "fit_heads": "attnflow.probes.fit",
    "fit_bank": "attnflow.probes.fit",
    "FitResult": "attnflow.probes.fit",
    "TrainOptions": "attnflow.probes.protocols",
    "RESULT_COLUMNS": "attnflow.probes.fit",
    "HeadBank": "attnflow.probes.bank",
    "BlockBank": "attnflow.probes.blockbank",
    "ProbeHead": "attnflow.probes.heads",
    "build_head": "attnflow.probes.heads",
    "HeadSpec": "attnflow.probes.specs",
    "HeadSpecError": "attnflow.probes.specs",
    "parse_head_spec": "attnflow.probes.specs",
    "parse_head_list": "attnflow.probes.specs",
    "LARS": "attnflow.probes.lars",
    "cosine_lr": "attnflow.probes.lars",
    "load_head": "attnflow.probes.outputs",
    "save_head": "attnflow.probes.outputs",
    "ProbeConfig": "attnflow.probes.protocols",
    "resolve_config": "attnflow.probes.protocols",
    "PROTOCOLS": "attnflow.probes.protocols",
    "extract_tokens": "attnflow.probes.cache",
    "TokenCache": "attnflow.probes.cache",
    "probe_images": "attnflow.probes.train",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return __all__
