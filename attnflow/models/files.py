"""Checkpoint files: reading any official format, hashing, local caches and short-timeout downloads.

Caches (resolved from the environment at call time, so tests and users can redirect them):

- the torch hub cache ``torch.hub.get_dir()/checkpoints/`` (``$TORCH_HOME/hub``), where the authors' files
  live under their own names, as ``torch.hub.load_state_dict_from_url`` stores them;
- the Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``) for weights timm hosts.

Nothing here touches the network when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE`` / ``ATTNFLOW_OFFLINE``)
is set, and every network call has a short timeout.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import re
import shlex
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import torch

from .converters import CheckpointError

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
"""Seconds to wait for a server to answer before treating it as unreachable."""

_TRUE = {"1", "on", "yes", "true"}
_HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")


def offline() -> bool:
    """Whether network access is off: ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE`` or ``ATTNFLOW_OFFLINE`` set."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ATTNFLOW_OFFLINE"))


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ reading

class _Stub(dict):
    """Stands in for a class whose module is not installed (yacs ``CfgNode`` configs, ...)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        self["__state__"] = state


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            logger.debug("checkpoint references %s.%s, which is not installed: replaced by a stub", module, name)
            return type(name, (_Stub,), {"__module__": module})


class _LenientPickle:
    """A ``pickle_module`` for ``torch.load`` that tolerates missing third-party classes."""

    Unpickler = _LenientUnpickler
    load = staticmethod(pickle.load)
    __name__ = "attnflow_lenient_pickle"


def read_checkpoint(path: str | os.PathLike) -> Any:
    """The object stored in a checkpoint file: safetensors, or any ``torch.save`` file (zip or legacy pickle),
    recognised by its content (:func:`file_format`), not its name.

    ``torch.load(weights_only=True)`` is tried first. Official files that also pickle configuration objects
    (DINO's ``argparse.Namespace``, SlowFast/SimMIM yacs configs) are then read with full unpickling, where
    classes that are not installed become plain dicts; a warning says so. Only load files you trust.

    Raises:
        CheckpointError: the file does not exist or cannot be read.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(_directory_message(path))
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    fmt = file_format(path)
    if fmt == "unknown":
        raise CheckpointError(f"cannot read checkpoint {path}: {_not_weights(path)}")
    if fmt == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # noqa: BLE001  (any decode error is a bad file)
            raise CheckpointError(f"cannot read safetensors file {path}: {err}") from None
    try:
        return _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        first_error = f"e.g. {found.group(1)}" if found else type(err).__name__
    except Exception as err:  # noqa: BLE001  (zip/EOF/magic-number errors: not a checkpoint)
        raise CheckpointError(f"cannot read checkpoint {path} (not a torch.save or safetensors file?): "
                              f"{type(err).__name__}: {err}") from None
    logger.warning("%s holds Python objects besides tensors (%s); reading it with full unpickling. "
                   "Only load checkpoints you trust.", path.name, first_error)
    try:
        return _torch_load(path, weights_only=False, pickle_module=_LenientPickle)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None


def _torch_load(path: Path, **kwargs: Any) -> Any:
    """``torch.load`` on CPU from an open file, so that the content decides the format, never the name
    (``torch.load`` reads any path ending in ``.safetensors`` as safetensors)."""
    with open(path, "rb") as f:
        return torch.load(f, map_location="cpu", **kwargs)


def file_format(path: str | os.PathLike) -> str:
    """The format of a weights file from its first bytes, whatever its name: ``"safetensors"``, ``"torch-zip"``
    (``torch.save`` since torch 1.6), ``"pickle"`` (legacy ``torch.save``) or ``"unknown"``.

    A safetensors file starts with its header length (8 bytes, little-endian) followed by that many bytes of
    JSON, an object (``{``); a zip archive starts with ``PK``; a pickle of protocol 2 or later with ``\\x80``.
    """
    with open(path, "rb") as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    if head[:2] == b"PK":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    return "unknown"


def _not_weights(path: Path) -> str:
    """Why a file of unknown format is not a checkpoint: its first bytes, and whether it is a web page."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "the file is empty"
    page = b"<html" in head.lower() or head.lstrip().lower().startswith(b"<!doctype")
    hint = ("; it is an HTML page (a download page or an error page?), not the weights: download the file "
            "itself" if page else "")
    return f"not a torch.save or safetensors file (it starts with {head[:16]!r}){hint}"


_WEIGHT_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".pyth", ".ckpt", ".safetensors")


def _directory_message(path: Path) -> str:
    """The error for a folder passed as a checkpoint: names the weight files inside it, if any."""
    inside = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    hint = f"; it holds {', '.join(inside[:5])}{', ...' if len(inside) > 5 else ''}" if inside else \
        "; it holds no weight file (.pth, .pth.tar, .pyth, .bin, .safetensors)"
    return f"checkpoint {path} is a folder, not a weights file: pass the file itself{hint}"


# ------------------------------------------------------------------------------------------------ caches

def torch_hub_checkpoint_dir() -> Path:
    """``torch.hub.get_dir()/checkpoints``, where ``load_state_dict_from_url`` keeps downloaded files."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub`` (default ``~/.cache/huggingface``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(os.path.expanduser(home)) / "hub"


def hf_filenames(filename: str | None) -> tuple[str, ...]:
    """Candidate weight files of a hub repo: the configured one, else safetensors then pytorch_model.bin."""
    return (filename,) if filename else _HF_FILENAMES


def find_hf_cached(repo_id: str, filename: str | None = None) -> Path | None:
    """The cached file of ``repo_id`` in the Hugging Face cache, or ``None`` (no network)."""
    from huggingface_hub import try_to_load_from_cache

    for name in hf_filenames(filename):
        found = try_to_load_from_cache(repo_id, name, cache_dir=str(hf_cache_dir()))
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    return None


def find_hub_cached(filename: str | None) -> Path | None:
    """``torch_hub_checkpoint_dir()/filename`` if that file exists, else ``None``."""
    if not filename:
        return None
    path = torch_hub_checkpoint_dir() / filename
    return path if path.is_file() else None


# ------------------------------------------------------------------------------------------- downloading

_REACHABLE: dict[str, bool] = {}


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of ``url`` accepts a TCP connection within ``timeout`` seconds in all, name lookup
    included (cached per process).

    Checked before any download so that a machine without network fails in seconds, not after the
    retries and back-off of the HTTP clients.
    """
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return False
    key = f"{host}:{port}"
    if key not in _REACHABLE:
        try:
            _connect(host, port, time.monotonic() + timeout)
            _REACHABLE[key] = True
        except OSError as err:
            logger.info("%s is not reachable: %s", key, err)
            _REACHABLE[key] = False
    return _REACHABLE[key]


def _resolve(host: str, port: int, timeout: float) -> list[tuple[Any, ...]]:
    """``socket.getaddrinfo`` for a TCP connection, given up after ``timeout`` seconds.

    The lookup runs in a daemon thread (``getaddrinfo`` itself has no timeout), which is left behind if it
    hangs.

    Raises:
        OSError: the lookup failed, or ``TimeoutError`` when it took longer than ``timeout``.
    """
    answer: list[Any] = []

    def lookup() -> None:
        try:
            answer.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as err:
            answer.append(err)

    thread = threading.Thread(target=lookup, name=f"attnflow-dns-{host}", daemon=True)
    thread.start()
    thread.join(max(timeout, 0.0))
    if not answer:
        raise TimeoutError(f"name lookup of {host} took more than {timeout:.1f} s")
    if isinstance(answer[0], OSError):
        raise answer[0]
    return answer[0]


def _connect(host: str, port: int, deadline: float) -> None:
    """Open and close a TCP connection to ``host:port`` before ``deadline`` (``time.monotonic()``).

    Raises:
        OSError: no address of ``host`` accepted a connection in time.
    """
    error: OSError = TimeoutError(f"no address of {host} answered in time")
    for family, kind, proto, _, address in _resolve(host, port, deadline - time.monotonic()):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(left)
                sock.connect(address)
            return
        except OSError as err:
            error = err
    raise error

def hf_download(repo_id: str, filename: str | None = None) -> Path | None:
    """Download a hub file with short timeouts; ``None`` when offline or unreachable (the reason is logged)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if offline() or not reachable(endpoint):
        return None
    from huggingface_hub import hf_hub_download

    for name in hf_filenames(filename):
        try:
            return Path(hf_hub_download(repo_id, name, cache_dir=str(hf_cache_dir()),
                                        etag_timeout=CONNECT_TIMEOUT_S))
        except Exception as err:  # noqa: BLE001  (missing file, no network, HTTP error: try the next source)
            logger.info("could not download %s/%s: %s", repo_id, name, str(err).splitlines()[0][:200])
    return None


def is_direct_url(url: str | None) -> bool:
    """Whether ``url`` points at a file (Google Drive pages need a browser and are not direct)."""
    return url is not None and url.startswith(("http://", "https://")) and "drive.google.com" not in url


def download_command(url: str, target: str | os.PathLike) -> str:
    """A shell command that downloads ``url`` to ``target`` on a fresh machine: it creates the folder (curl's
    ``-o`` does not), fails on an HTTP error instead of saving the error page (``-f``), and downloads into
    ``<target>.part``, renamed once complete, so an interrupted download never sits where attnflow looks.

    Example: ``mkdir -p /c/hub/checkpoints && curl -fL -o /c/hub/checkpoints/w.pth.part https://x/w.pth &&
    mv /c/hub/checkpoints/w.pth.part /c/hub/checkpoints/w.pth`` (paths and URL shell-quoted where needed).
    """
    path = Path(target)
    part = path.with_name(path.name + ".part")
    q = shlex.quote
    return f"mkdir -p {q(str(path.parent))} && curl -fL -o {q(str(part))} {q(url)} && mv {q(str(part))} {q(str(path))}"


def url_download(url: str, filename: str) -> Path | None:
    """Download ``url`` into the torch hub cache as ``filename`` (atomic rename, tqdm progress).

    Returns ``None`` when offline, when the URL is not a direct file link, or when the server cannot be
    reached within :data:`CONNECT_TIMEOUT_S` (the reason is logged).
    """
    if offline() or not is_direct_url(url) or not reachable(url):
        return None
    from tqdm.auto import tqdm

    target = torch_hub_checkpoint_dir() / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=CONNECT_TIMEOUT_S) as response:  # noqa: S310 (https URL)
            total = int(response.headers.get("Content-Length") or 0) or None
            with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{filename}.", delete=False) as tmp, \
                    tqdm(total=total, unit="B", unit_scale=True, desc=filename, file=sys.stderr) as bar:
                for block in iter(lambda: response.read(io.DEFAULT_BUFFER_SIZE * 64), b""):
                    tmp.write(block)
                    bar.update(len(block))
        shutil.move(tmp.name, target)
    except Exception as err:  # noqa: BLE001  (DNS, timeout, HTTP error)
        logger.info("could not download %s: %s", url, err)
        if "tmp" in locals() and os.path.exists(tmp.name):
            os.unlink(tmp.name)
        return None
    return target
