"""Fast decoding: JPEGs decoded by libjpeg-turbo through ``torchvision.io``, resized and cropped on uint8 tensors in the
loader workers, handed to the device as uint8 batches and converted and normalised there.

The geometry is read off the model's own eval transform (:func:`attnflow.data.transforms.eval_transform`: timm's
``Resize`` of the shorter side, ``CenterCrop``, ``Normalize``; or localization's square resize), so the fast path
applies the same resize size, interpolation, antialiasing, crop and normalisation. torchvision's JPEG decode gives
the same pixels as PIL's (both are libjpeg-turbo); only the resampling arithmetic differs (torchvision's uint8
kernels instead of PIL's: at most 2 grey levels per pixel; the effect on the statistics is measured by
``benchmarks/bench_loader.py`` and stated in docs/performance.md). Every other file goes through PIL exactly as the
exact path reads it, resize and crop included, so its pixels are the exact path's: other formats (PNG, TIFF,
16-bit, float, GIF, ...), CMYK JPEGs, a PNG named ``.jpg``, and files libjpeg-turbo refuses (a truncated or corrupt
file is then skipped with PIL's own reason). EXIF orientation is not applied, as on the exact path.

Decode modes (the ``decode`` loop option, :data:`attnflow.options.DECODES`):

==========  ====================================================================================================
``pil``     the exact path: PIL decode and timm's transform in the workers, float batches
``fast``    libjpeg-turbo decode, uint8 resize and crop in the workers, uint8 batches normalised on the device
``gpu``     JPEGs decoded on the CUDA device (``torchvision.io.decode_jpeg(..., device="cuda")``, batched), then
            the same uint8 resize, crop and normalisation there; other files as ``fast``
``auto``    ``fast`` (see docs/performance.md for why)
==========  ====================================================================================================
"""

from __future__ import annotations

import dataclasses
import functools
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import transforms as T

from ..options import DECODES, decode_mode, parse_decode
from .images import IMAGE_READ_ERRORS, Encoded, ImageBatch, load_rgb

__all__ = ["DECODES", "EncodedJpeg", "TensorTransform", "decode_mode", "fast_transform", "parse_decode"]

JPEG_SUFFIXES = frozenset({".jpg", ".jpeg"})
"""Files tried with libjpeg-turbo first (case-insensitive); a file that is no baseline or progressive RGB or
grayscale JPEG goes to PIL."""

_DECODED_MODES = frozenset({"RGB", "L"})
"""PIL modes of the JPEGs libjpeg-turbo decodes here (CMYK and others: PIL, as the exact path)."""


_TENSOR_INTERPOLATIONS = frozenset({T.InterpolationMode.BILINEAR, T.InterpolationMode.BICUBIC})
"""Resizes the uint8 tensor path reproduces within 2 grey levels of PIL's (others use the exact path)."""


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG file's bytes (uint8 ``[n]``), kept encoded for the device (``decode="gpu"``), and its path."""

    data: torch.Tensor
    path: str


def _torchvision_io() -> Any:
    """``torchvision.io`` with its deprecation warning (torchvision 0.29 points to TorchCodec) silenced here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import torchvision.io

    return torchvision.io


def _decode_jpeg(data: Any, device: str | torch.device = "cpu") -> Any:
    """``torchvision.io.decode_jpeg(data, mode=RGB, device=device)`` without its deprecation warning."""
    tvio = _torchvision_io()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return tvio.decode_jpeg(data, mode=tvio.ImageReadMode.RGB, device=device)


def _read_file(path: Path) -> torch.Tensor:
    """``torchvision.io.read_file(path)`` (the bytes, uint8 ``[n]``) without its deprecation warning."""
    tvio = _torchvision_io()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return tvio.read_file(str(path))


@dataclass(frozen=True)
class TensorTransform:
    """An eval transform's resize, centre crop and normalisation, for uint8 tensors.

    Attributes:
        pil: the exact transform (PIL in, float tensor out), which defines this one; its resize and crop steps read
            every file that is not decoded by libjpeg-turbo.
        size: the ``Resize`` size (an int: the shorter side; a pair: ``(H, W)``).
        interpolation: its interpolation.
        antialias: its antialiasing.
        crop: the ``CenterCrop`` size ``(H, W)``, or ``None``.
        mean, std: the normalisation (of ``[0, 1]`` pixels).
        encoded: keep JPEGs encoded (``decode="gpu"``: they are decoded on the device).
        check: ``(width, height) ->`` raises :class:`~attnflow.data.images.ImageSizeError` for an image whose resize
            would be too large (the exact transform's :class:`~attnflow.data.transforms.BoundedResize`).
    """

    pil: Any = dataclasses.field(repr=False)
    size: int | tuple[int, int]
    interpolation: T.InterpolationMode
    antialias: bool
    crop: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    encoded: bool = False
    check: Callable[[int, int], None] | None = dataclasses.field(default=None, repr=False)

    reads_files: ClassVar[bool] = True
    """Datasets hand this transform the file's path (not a PIL image): see :func:`attnflow.data.read_sample`."""

    @classmethod
    def of(cls, transform: Any, *, encoded: bool = False) -> "TensorTransform | None":
        """The tensor form of ``transform`` (a ``Compose`` of a bilinear or bicubic ``Resize``, optional
        ``CenterCrop``, to-tensor and ``Normalize``), or ``None`` for any other transform (then the exact path is
        used). Nearest-neighbour resizes stay on PIL: torch samples source pixel ``floor(i * s)`` where PIL takes
        ``floor((i + 0.5) * s)``, a grid up to a pixel apart (every timm pretrained config is bilinear or bicubic)."""
        steps = list(getattr(transform, "transforms", []))
        names = [type(s).__name__ for s in steps]
        if len(steps) not in (3, 4) or names[0] not in ("Resize", "BoundedResize") or names[-1] != "Normalize" \
                or names[-2] not in ("ToTensor", "MaybeToTensor") or (len(steps) == 4 and names[1] != "CenterCrop"):
            return None
        resize, normalize = steps[0], steps[-1]
        if getattr(resize, "max_size", None) is not None or resize.interpolation not in _TENSOR_INTERPOLATIONS:
            return None
        size = resize.size if isinstance(resize.size, int) else tuple(resize.size)
        if isinstance(size, tuple) and len(size) == 1:
            size = size[0]
        crop = tuple(steps[1].size) if len(steps) == 4 else None
        return cls(transform, size, resize.interpolation, resize.antialias is not False, crop,
                   tuple(float(m) for m in normalize.mean), tuple(float(s) for s in normalize.std), encoded,
                   getattr(resize, "check", None))

    def __call__(self, path: str | Path) -> Any:
        """The file's image, resized and cropped: uint8 ``[3, H, W]`` (or an :class:`EncodedJpeg`)."""
        return self.read(Path(path))[0]

    def read(self, path: Path) -> tuple[Any, tuple[int, int]]:
        """The file's image, resized and cropped (uint8 ``[3, H, W]``, or an :class:`EncodedJpeg` kept for the
        device), and its ``(width, height)`` before the transform.

        Raises:
            What PIL raises for the file (:data:`~attnflow.data.images.IMAGE_READ_ERRORS`), or
            :class:`~attnflow.data.images.ImageSizeError`: exactly where the exact path raises them.
        """
        if path.suffix.lower() in JPEG_SUFFIXES:
            jpeg = self._read_jpeg(path)
            if jpeg is not None:
                return jpeg
        image = load_rgb(path)
        steps = self.pil.transforms  # the exact path's resize and crop, on the PIL image
        resized = steps[1](steps[0](image)) if self.crop is not None else steps[0](image)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1)   # [3, H, W]
        return pixels, (int(image.size[0]), int(image.size[1]))

    def _read_jpeg(self, path: Path) -> tuple[Any, tuple[int, int]] | None:
        """An RGB or grayscale JPEG decoded by libjpeg-turbo, resized and cropped (or kept encoded); ``None`` for a
        file PIL must read (another format or mode, or one libjpeg-turbo refuses: PIL then reads it or raises
        its own error for it)."""
        try:
            data = _read_file(path)
            with Image.open(io.BytesIO(data.numpy().tobytes())) as header:  # the header only; PIL's size limit applies
                fmt, mode, size = header.format, header.mode, (int(header.size[0]), int(header.size[1]))
        except (RuntimeError, OSError, ValueError, SyntaxError):  # RuntimeError and IMAGE_READ_ERRORS: PIL decides
            return None
        if fmt != "JPEG" or mode not in _DECODED_MODES:
            return None
        if self.check is not None:
            self.check(*size)  # an extreme aspect ratio: refused before anything is decoded
        if self.encoded:
            return EncodedJpeg(data, str(path)), size
        try:
            image = _decode_jpeg(data)                                                       # [3, H, W] uint8
        except RuntimeError:
            return None
        return self.geometry(image), size

    def geometry(self, image: torch.Tensor) -> torch.Tensor:
        """Resize and crop one uint8 image ``[3, H, W]`` (on any device), as the exact transform does."""
        size = [self.size] if isinstance(self.size, int) else list(self.size)
        image = TF.resize(image, size, interpolation=self.interpolation, antialias=self.antialias)
        return TF.center_crop(image, list(self.crop)) if self.crop is not None else image

    def on_device(self, batch: ImageBatch, device: torch.device) -> ImageBatch:
        """A batch of uint8 images (``[B, 3, H, W]``, or an :class:`~attnflow.data.images.Encoded` list) on
        ``device`` as the exact path's floats, ``(x / 255 - mean) / std`` in float32 (JPEGs still encoded are
        decoded there first; one the device cannot decode and PIL cannot read is skipped and listed in ``bad``)."""
        images, bad = batch.images, list(batch.bad)
        keep: list[int] | None = None
        if isinstance(images, Encoded):
            images, keep, failed = self._decode(images, device)
            bad += failed
        x = images.to(device, non_blocking=True).float().div_(255.0)
        mean, std = _normalizer(self.mean, self.std, device)
        out = dataclasses.replace(batch, images=x.sub_(mean).div_(std), bad=bad)
        if keep is not None and len(keep) < len(batch.labels):
            index = torch.tensor(keep, dtype=torch.int64)
            out = dataclasses.replace(out, labels=batch.labels[index], indices=batch.indices[index],
                                      sizes=batch.sizes[index] if batch.sizes is not None else None)
        return out

    def _decode(self, items: Sequence[Any], device: torch.device
                ) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
        """The batch's uint8 images on ``device``: its encoded JPEGs decoded there in one call (one by one if that
        fails, then by PIL on the host), resized and cropped there. Returns the images, the positions kept and
        ``(path, reason)`` of the files no decoder can read."""
        jpegs = [i for i, item in enumerate(items) if isinstance(item, EncodedJpeg)]
        try:
            decoded = _decode_jpeg([items[i].data for i in jpegs], device) if jpegs else []
        except RuntimeError:
            decoded = [self._decode_one(items[i], device) for i in jpegs]
        images: dict[int, torch.Tensor] = {i: image for i, image in zip(jpegs, decoded) if image is not None}
        images.update({i: item.to(device) for i, item in enumerate(items) if i not in jpegs})
        keep = sorted(images)
        bad = [(items[i].path, self._reason(items[i])) for i in jpegs if i not in images]
        resized = [self.geometry(images[i]) if i in jpegs else images[i] for i in keep]
        return (torch.stack(resized) if resized else torch.empty(0, 3, 1, 1, dtype=torch.uint8)), keep, bad

    @staticmethod
    def _decode_one(item: EncodedJpeg, device: torch.device) -> torch.Tensor | None:
        """One JPEG decoded on ``device``, else by PIL from its bytes; ``None`` when neither reads it."""
        try:
            return _decode_jpeg(item.data, device)
        except RuntimeError:
            pass
        try:
            with Image.open(io.BytesIO(item.data.numpy().tobytes())) as img:
                pixels = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
        except IMAGE_READ_ERRORS:
            return None
        return torch.from_numpy(pixels).permute(2, 0, 1).to(device)

    @staticmethod
    def _reason(item: EncodedJpeg) -> str:
        """Why PIL cannot read a file (as the exact path lists it)."""
        try:
            load_rgb(item.path)
        except IMAGE_READ_ERRORS as err:
            return f"unreadable image: {err}"
        return "unreadable image: neither the device's JPEG decoder nor PIL could read it"


@functools.lru_cache(maxsize=8)
def _normalizer(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` as ``[1, C, 1, 1]`` float32 tensors on ``device``, made once per run rather than copied
    to the device (a blocking copy on CUDA) with every batch."""
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1))


def fast_transform(transform: Callable, decode: str, device: torch.device | str = "cpu") -> Callable:
    """``transform`` for the decode mode: itself for ``pil``, else its :class:`TensorTransform` (``transform`` when
    it has none: a transform other than resize, crop and normalise).

    Raises:
        OptionError: an unknown decode word, or ``gpu`` on a device that is not CUDA.
    """
    mode = decode_mode(decode, torch.device(device))
    if mode == "pil":
        return transform
    return TensorTransform.of(transform, encoded=mode == "gpu") or transform


def decode_of(transform: Any) -> str:
    """The decode path a dataset's transform takes: ``gpu``, ``fast`` or ``pil`` (for provenance and resumes)."""
    if isinstance(transform, TensorTransform):
        return "gpu" if transform.encoded else "fast"
    return "pil"
