"""Feature cache: frozen tokens extracted once (optionally K augmented views) to disk, then many epochs.

A cache directory holds::

    tokens.npy      [views, n, P + N, D]  bf16 (stored as uint16 bits) or fp16, memory-mapped
    tokens_b{B}.npy instead of tokens.npy, one per block B (0-based) when the encoder reads several blocks
                    (:class:`~attnflow.encode.BlockTokenEncoder`); the manifest lists them (``blocks``, ``files``)
    labels.npy      [n] int64
    valid.npy       [n] bool (False for images that could not be read; they are skipped)
    manifest.json   model, checkpoint sha256, encoder fingerprint, dataset, transform, dtype, views, seed, block,
                    layernorm, ..., and once complete the unreadable files (``unreadable``, ``skipped``)
    viewK.state.pt  while extracting: the loop's state of view K (:mod:`attnflow.loop`: the batches done)

Extraction runs on the one resumable loop (one pass per view, in this process alone): an interrupted run
continues at the first unfinished batch when the manifest matches; a different manifest is an error (use another
directory). Each view's augmentation is seeded per
``(seed, view, image)``, so a resumed cache is identical to an uninterrupted one.

Several blocks: one forward pass per batch gives every block's tokens ``[b, L, P + N, D]``; the loop's commit writes
block ``blocks[i]``'s slice into its own memory-mapped file and flushes it, so memory holds one batch of every
block, never the dataset's tokens of any block (a whole-dataset array of all blocks, ``views x n x L x T x D``,
would not fit: ImageNet's 1.28M training images take about 390 GB per block of ViT-B in bf16). Training reads each
micro-batch's rows from every file and stacks them, ``[m, L, P + N, D]``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset
from ..atomic import write_atomically
from ..data.sources import ImageSource
from ..encode import TokenEncoder
from ..errors import AttnflowError
from ..loop import Analysis, Ready, run_loop
from ..options import LoopOptions, dtype_name
from ..runstate import RunState
from .imagedata import SeededDataset, dataset_labels
from .loop import Batch
from .sampler import BatchPlan

log = logging.getLogger(__name__)

DTYPES = {"bf16": (torch.bfloat16, np.uint16), "fp16": (torch.float16, np.float16)}
IDENTITY_KEYS = ("model", "checkpoint_sha256", "encoder", "dataset", "split", "n", "transform", "dtype", "views",
                 "seed", "block", "blocks", "layernorm", "img_size", "amp")
"""Manifest fields that must match for a cache to be reused or resumed."""


def token_files(manifest: dict[str, Any]) -> list[str]:
    """The token files of a cache: ``tokens.npy``, or ``tokens_b{B}.npy`` per block of a several-block cache."""
    blocks = manifest.get("blocks")
    return [f"tokens_b{b}.npy" for b in blocks] if blocks else ["tokens.npy"]


@dataclass
class TokenCache:
    """An opened (complete) cache.

    Attributes:
        root: the cache directory.
        manifest: its manifest.
        arrays: one ``[views, n, P + N, D]`` tensor per block (bf16 or fp16), each backed by its memory-mapped
            file, in :attr:`blocks` order; one for a one-block cache.
        labels: ``[n]`` int64.
        readable: ``[n]`` bool, False for images that could not be read.
    """

    root: Path
    manifest: dict[str, Any]
    arrays: list[torch.Tensor]
    labels: torch.Tensor
    readable: torch.Tensor

    @classmethod
    def open(cls, root: str | Path) -> "TokenCache":
        """Open a complete cache (memory-mapped, nothing is read up front)."""
        root = Path(root)
        manifest = _read_json(root / "manifest.json")
        if manifest is None or not manifest.get("complete"):
            raise AttnflowError(f"{root} is not a complete token cache; run the extraction (again) to finish it")
        torch_dtype, _ = DTYPES[manifest["dtype"]]
        arrays = []
        for name in token_files(manifest):
            tokens = torch.from_numpy(np.load(root / name, mmap_mode="c"))  # copy-on-write: never modified
            arrays.append(tokens.view(torch_dtype) if manifest["dtype"] == "bf16" else tokens)
        labels = torch.from_numpy(np.load(root / "labels.npy"))
        readable = torch.from_numpy(np.load(root / "valid.npy"))
        return cls(root, manifest, arrays, labels, readable)

    @property
    def tokens(self) -> torch.Tensor:
        """``[views, n, P + N, D]``: the tokens of a one-block cache (a several-block cache: :meth:`block_tokens`).

        Raises:
            AttnflowError: the cache holds several blocks.
        """
        if len(self.arrays) != 1:
            raise AttnflowError(f"{self.root} holds the tokens of blocks {self.blocks}; read one with block_tokens")
        return self.arrays[0]

    @property
    def blocks(self) -> list[int] | None:
        """The blocks of a several-block cache, ascending (0-based); ``None`` for a one-block cache."""
        blocks = self.manifest.get("blocks")
        return [int(b) for b in blocks] if blocks else None

    def block_tokens(self, block: int) -> torch.Tensor:
        """``[views, n, P + N, D]``: the tokens of ``block`` (0-based) in a several-block cache.

        Raises:
            AttnflowError: the cache does not hold ``block``.
        """
        if not self.blocks or block not in self.blocks:
            raise AttnflowError(f"{self.root} does not hold the tokens of block {block} (it holds "
                                f"{self.blocks or self.manifest.get('block')})")
        return self.arrays[self.blocks.index(block)]

    def _rows(self, views: torch.Tensor | int, rows: torch.Tensor) -> torch.Tensor:
        """``[m, P + N, D]`` (one block) or ``[m, L, P + N, D]`` (several) float32 tokens of ``rows``, each read
        in view ``views`` (one per row, or one for all)."""
        if len(self.arrays) == 1:
            return self.arrays[0][views, rows].float()
        return torch.stack([a[views, rows].float() for a in self.arrays], dim=1)

    @property
    def has_cls(self) -> bool:
        return bool(self.manifest["has_cls"])

    @property
    def views(self) -> int:
        return int(self.manifest["views"])

    @property
    def valid(self) -> torch.Tensor:
        """Row indices of readable images."""
        return torch.nonzero(self.readable).flatten()

    def train_batches(self, plan: BatchPlan, seed: int, rows: torch.Tensor | None = None
                      ) -> Callable[[int], Iterator[Batch]]:
        """Micro-batches for :func:`attnflow.probes.loop.train_bank`; ``plan`` indexes ``rows`` (default
        :attr:`valid`: every readable row). Tokens ``[m, P + N, D]``, or ``[m, L, P + N, D]`` from a several-block
        cache (each block's rows read from its own file).

        With several views each sample of an epoch reads one view drawn by ``(seed, epoch)``.
        """
        rows = self.valid if rows is None else rows

        def epoch_batches(epoch: int) -> Iterator[Batch]:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7_919 + 99)
            view_of = torch.randint(self.views, (len(rows),), generator=generator)
            for step in plan.epoch(epoch):
                for idx in step:
                    sel, views = rows[idx], view_of[idx]
                    yield self._rows(views, sel), self.labels[sel]

        return epoch_batches

    def eval_batches(self, batch_size: int = 512, rows: torch.Tensor | None = None) -> Callable[[], Iterator[Batch]]:
        """View 0 of ``rows`` (default: every readable image), in order (this process's shard); tokens as
        :meth:`train_batches` gives them."""
        from .fit import eval_batches

        rows = self.valid if rows is None else rows
        index = eval_batches(rows, rows, batch_size)

        def batches() -> Iterator[Batch]:
            for sel, _ in index():
                yield self._rows(0, sel), self.labels[sel]

        return batches


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, default=str)
    write_atomically({path: lambda tmp: tmp.write_text(text)})


@dataclass
class _Extraction:
    """What an extraction has written so far: tokens (memory maps, one per token file), labels and readable flags,
    all on disk after each batch (the loop's state file per view says which batches)."""

    root: Path
    manifest: dict[str, Any]
    labels: np.ndarray  # [n] int64, -1 where not read yet
    readable: np.ndarray  # [n] bool
    arrays: list[np.memmap] | None  # one [views, n, T, D] per token file, created at the first readable batch

    @classmethod
    def start(cls, root: Path, manifest: dict[str, Any], n: int) -> "_Extraction":
        labels, readable = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=bool)
        arrays = None
        files = [root / name for name in token_files(manifest)]
        if all(f.is_file() for f in files) and (root / "valid.npy").is_file():  # an interrupted extraction
            labels, readable = np.load(root / "labels.npy"), np.load(root / "valid.npy")
            arrays = [np.load(f, mmap_mode="r+") for f in files]
        return cls(root, manifest, labels, readable, arrays)

    @property
    def shape(self) -> list[int] | None:
        """``[views, n, T, D]`` of each token file (``None`` before the first readable batch)."""
        return list(self.arrays[0].shape) if self.arrays else None

    def add(self, view: int, indices: np.ndarray, labels: np.ndarray, tokens: torch.Tensor) -> None:
        """Store one batch's tokens ``[b, T, D]`` (one block) or ``[b, L, T, D]`` (several; ``tokens[:, i]`` goes
        to the ``i``-th token file), already in the cache dtype, of ``view``, on disk."""
        dtype = self.manifest["dtype"]
        parts = list(tokens.unbind(1)) if self.manifest.get("blocks") else [tokens]
        if self.arrays is None:
            shape = (self.manifest["views"], self.manifest["n"], *parts[0].shape[1:])
            self.arrays = [np.lib.format.open_memmap(self.root / name, mode="w+", dtype=DTYPES[dtype][1], shape=shape)
                           for name in token_files(self.manifest)]
            _write_json(self.root / "manifest.json", {**self.manifest, "complete": False, "shape": list(shape)})
        for array, part in zip(self.arrays, parts):
            array[view, indices] = (part.view(torch.uint16) if dtype == "bf16" else part).numpy()
            array.flush()
        self.labels[indices] = labels
        self.readable[indices] = True
        np.save(self.root / "labels.npy", self.labels)
        np.save(self.root / "valid.npy", self.readable)


class _TokenStep:
    """The loop step of one view: the encoder's tokens of a batch, stored when the loop commits the batch."""

    def __init__(self, encoder: TokenEncoder, extraction: _Extraction, view: int, dtype: str) -> None:
        self.encoder, self.extraction, self.view, self.dtype = encoder, extraction, view, DTYPES[dtype][0]

    def __call__(self, batch: Any) -> Ready:
        tokens = self.encoder(batch.images).to(self.dtype).cpu()
        indices, labels = batch.indices.numpy(), batch.labels.numpy()
        return Ready(lambda: self.extraction.add(self.view, indices, labels, tokens))


def _cache_manifest(encoder: TokenEncoder, info: dict[str, Any], n: int, views: int, seed: int, dtype: str
                    ) -> dict[str, Any]:
    """The identity and layout of a cache; a several-block encoder adds ``blocks`` and its token ``files``."""
    manifest = {**info, "n": n, "dtype": dtype, "views": views, "seed": seed, "encoder": encoder.fingerprint,
                "block": encoder.block, "layernorm": encoder.layernorm, "has_cls": encoder.has_cls,
                "amp": dtype_name(encoder.amp_dtype), "format": "attnflow-token-cache/1"}
    blocks = getattr(encoder, "blocks", None)
    if blocks is not None:
        manifest["blocks"] = list(blocks)
        manifest["files"] = token_files(manifest)
    return manifest


def _reusable(root: Path, manifest: dict[str, Any]) -> tuple[TokenCache | None, dict[str, Any]]:
    """The complete cache already in ``root`` (or ``None``) and the manifest to extract under.

    Raises:
        AttnflowError: ``root`` holds the cache of other tokens.
    """
    old = _read_json(root / "manifest.json")
    if old is None:
        return None, manifest
    diff = [k for k in IDENTITY_KEYS if old.get(k) != manifest.get(k)]
    if diff:
        raise AttnflowError(f"{root} holds a different token cache (differs in {', '.join(diff)}); "
                            "use another cache directory or delete it")
    if old.get("complete"):
        log.info("reusing complete token cache %s", root)
        return TokenCache.open(root), old
    return None, {**old, **manifest}


def extract_tokens(encoder: TokenEncoder, dataset: Dataset, out_dir: str | Path, *, info: dict[str, Any],
                   views: int = 1, seed: int = 0, dtype: str = "bf16", batch_size: int = 256, workers: int = 0,
                   progress: bool = True) -> TokenCache:
    """Extract tokens of every image (``views`` times, seeded augmentation) into a resumable disk cache.

    Args:
        encoder: the frozen encoder; a :class:`~attnflow.encode.BlockTokenEncoder` writes one token file per block
            from its one forward pass per batch.
        dataset: items ``(image, label, index)`` or :class:`attnflow.data.BadImage`; its transform is applied
            per view (a random transform gives a new crop per view).
        out_dir: the cache directory.
        info: provenance and identity: ``model, checkpoint_sha256, dataset, split, transform, img_size``.
        views: augmented views per image.
        seed: augmentation seed.
        dtype: ``"bf16"`` or ``"fp16"``.
        batch_size: images per encoder pass.
        workers: DataLoader workers (0: load in this process).
        progress: show a progress bar.

    Returns:
        The opened cache (reused as is when an identical complete cache exists).
    """
    if dtype not in DTYPES:
        raise AttnflowError(f"cache dtype must be bf16 or fp16, got {dtype!r}")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    n = len(dataset)  # type: ignore[arg-type]
    complete, manifest = _reusable(root, _cache_manifest(encoder, info, n, views, seed, dtype))
    if complete is not None:
        return complete
    extraction = _Extraction.start(root, manifest, n)
    skipped: dict[str, str] = {}  # path -> reason of the files that could not be read (in any view)
    for view in range(views):  # one pass of the loop per view; each keeps its state until the cache is complete
        analysis = Analysis(f"extract view {view + 1}/{views}", _TokenStep(encoder, extraction, view, dtype), {},
                            {"cache": {k: manifest.get(k) for k in IDENTITY_KEYS}, "view": view}, local=True)
        options = LoopOptions(batch_size=batch_size, device=str(encoder.device), workers=workers, progress=progress,
                              state_path=root / f"view{view}.state.pt", resume=True, checkpoint_every=1,
                              keep_state=True)
        run = run_loop(analysis, ImageSource(dataset=SeededDataset(dataset, seed, view)), options)
        for path, reason in run.skipped:
            skipped.setdefault(path, reason)
    cache = _finish(extraction, dataset, info, skipped)
    for view in range(views):
        RunState(root / f"view{view}.state.pt", {}).remove()
    return cache


def _finish(state: _Extraction, dataset: Dataset, info: dict[str, Any], skipped: dict[str, str]) -> TokenCache:
    """Check the labels, mark the cache complete (with its unreadable files) and open it."""
    if state.arrays is None:
        raise AttnflowError(f"no readable image in {info.get('dataset', 'the dataset')}")
    expected = dataset_labels(dataset).numpy()
    if not np.array_equal(state.labels[state.readable], expected[state.readable]):
        raise AttnflowError(f"labels read during extraction disagree with the dataset's labels in {state.root}")
    _write_json(state.root / "manifest.json", {**state.manifest, "complete": True, "shape": state.shape,
                                               "unreadable": int((~state.readable).sum()),
                                               "skipped": [{"path": p, "reason": r} for p, r in skipped.items()]})
    return TokenCache.open(state.root)
