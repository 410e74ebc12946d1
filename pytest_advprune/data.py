"""Datasets as in-memory tensors, read from torchvision's on-disk formats.

Every loader returns ``(x, y)``: ``x`` float32 of shape ``[N, C, H, W]`` with pixels in
[0, 1] (no normalisation: models carry their own), ``y`` int64 of shape ``[N]``.

Data-dir resolution, in order (first that holds the files wins):
  1. the explicit ``data_dir`` argument (``--advprune-data-dir``),
  2. the ``ADVPRUNE_DATA_DIR`` environment variable,
  3. Debian's dataset packages (``/usr/share/datasets/<name>``, e.g. ``dataset-fashion-mnist``),
  4. torchvision's download into ``download_dir`` (needs internet).
A dataset found nowhere raises :class:`DatasetNotFound` with one line naming these options.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DatasetNotFound

ENV_VAR = "ADVPRUNE_DATA_DIR"
DEBIAN_ROOT = Path("/usr/share/datasets")


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts of a dataset: shape, classes, and per-channel mean/std (for in-model normalisation)."""

    name: str
    channels: int
    size: int
    n_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    debian_package: str | None
    augment: str = "none"


# Training augmentation (see :func:`augment_batch`): CIFAR-10 as in the survey methods' public code
# (RandomCrop(32, padding=4) + RandomHorizontalFlip); SVHN crops only, since a mirrored digit is
# another glyph; Fashion-MNIST none, as the quick preset was trained.
DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo("fashion_mnist", 1, 28, 10, (0.2860,), (0.3530,), "dataset-fashion-mnist"),
    "cifar10": DatasetInfo("cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), None,
                           "crop+flip"),
    "svhn": DatasetInfo("svhn", 3, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), None, "crop"),
}

AUGMENTATIONS = ("none", "crop", "crop+flip")
CROP_PADDING = 4


def candidate_dirs(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """The directories searched for ``name``, in resolution order (see module docstring)."""
    dirs: list[Path] = []
    if data_dir:
        dirs.append(Path(data_dir))
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]))
    dirs.append(DEBIAN_ROOT / name.replace("_", "-"))
    return dirs


# ---------------------------------------------------------------- Fashion-MNIST (idx format)

_FMNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (the MNIST format; gzipped or not) into a numpy array.

    Raises ValueError if the header is not a uint8 idx header or the payload size does not match.
    """
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            raise ValueError(f"{path}: truncated or corrupt gzip file ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not a uint8 idx file")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated idx header ({len(raw)} bytes for {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    payload = raw[4 + 4 * ndim :]
    if len(payload) != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated idx file ({len(payload)} bytes for shape {dims})")
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


def _find_fmnist(root: Path, train: bool) -> tuple[Path, Path] | None:
    for folder in (root, root / "FashionMNIST" / "raw", root / "fashion-mnist"):
        found = []
        for stem in _FMNIST_FILES[train]:
            hit = next((folder / (stem + ext) for ext in (".gz", "") if (folder / (stem + ext)).is_file()), None)
            found.append(hit)
        if all(found):
            return found[0], found[1]
    return None


def _load_fmnist(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    paths = _find_fmnist(root, train)
    if paths is None:
        return None
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if len(images) != len(labels):
        raise ValueError(f"{paths[0]}: {len(images)} images but {len(labels)} labels")
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------- CIFAR-10 (python pickle batches)


def _latin1_encode(text, encoding="latin1", errors="strict"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refusing a codec call other than latin1 from a dataset file")
    return text.encode("latin1")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR's batch files that refuses anything but numpy arrays and builtins.

    CIFAR-10's python format is pickle; a crafted file could run code through a plain
    ``pickle.load``, so only the globals numpy needs to rebuild arrays are allowed.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # arrays pickled with protocol 5
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):  # how Python 3 writes bytes at protocol 2
            return _latin1_encode
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as fh:
        entry = _NumpyOnlyUnpickler(io.BufferedReader(fh), encoding="latin1").load()
    data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"], dtype=np.int64)
    return data, labels


def _load_cifar10(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    if not all((folder / n).is_file() for n in names):
        return None
    parts = [_read_cifar_batch(folder / n) for n in names]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(x), torch.from_numpy(y)


# ---------------------------------------------------------------- SVHN (MATLAB .mat, cropped digits)


def _load_svhn(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    path = root / ("train_32x32.mat" if train else "test_32x32.mat")
    if not path.is_file():
        return None
    import scipy.io

    mat = scipy.io.loadmat(str(path))
    x = np.transpose(mat["X"], (3, 2, 0, 1)).astype(np.uint8)  # (H, W, C, N) -> (N, C, H, W)
    y = mat["y"].astype(np.int64).reshape(-1)
    y[y == 10] = 0  # SVHN stores digit 0 as label 10, as torchvision maps it
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)


_READERS = {"fashion_mnist": _load_fmnist, "cifar10": _load_cifar10, "svhn": _load_svhn}


def _download(name: str, root: Path, train: bool) -> None:
    import torchvision.datasets as tvd

    root.mkdir(parents=True, exist_ok=True)
    if name == "fashion_mnist":
        tvd.FashionMNIST(str(root), train=train, download=True)
    elif name == "cifar10":
        tvd.CIFAR10(str(root), train=train, download=True)
    else:
        tvd.SVHN(str(root), split="train" if train else "test", download=True)


def load(
    name: str,
    train: bool,
    data_dir: str | os.PathLike | None = None,
    download_dir: str | os.PathLike | None = None,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a split of ``name`` as tensors ``x`` [N, C, H, W] float32 in [0, 1] and ``y`` [N] int64.

    ``limit`` keeps the first ``limit`` points (deterministic subset, no shuffling).
    Raises :class:`DatasetNotFound` when no searched place holds the files and download fails,
    and ``KeyError`` for an unknown dataset name.
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    reader = _READERS[name]
    searched = candidate_dirs(name, data_dir)
    loaded = None
    for root in searched:
        loaded = reader(root, train)
        if loaded is not None:
            break
    if loaded is None and download_dir is not None:
        root = Path(download_dir) / name
        try:
            _download(name, root, train)
        except Exception as exc:  # no internet here is the common case; say so in one line
            download_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        else:
            download_error = ""
            loaded = reader(root, train)
            if loaded is None and name == "fashion_mnist":
                loaded = reader(root / "FashionMNIST" / "raw", train)
        searched.append(root)
    if loaded is None:
        info = DATASETS[name]
        hint = f"`apt-get install {info.debian_package}`, " if info.debian_package else ""
        tried = ", ".join(str(p) for p in searched)
        failed = f" (download failed: {download_error})" if download_dir is not None and download_error else ""
        raise DatasetNotFound(
            f"dataset {name} ({'train' if train else 'test'} split) not found in {tried}{failed}; "
            f"fix: {hint}pass --advprune-data-dir=DIR or set {ENV_VAR}=DIR to a folder in torchvision's format"
        )
    x, y = loaded
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x.float().div_(255.0), y


# ---------------------------------------------------------------- augmentation on the device


def draw_augmentation(kind: str, n: int, generator: torch.Generator, padding: int = CROP_PADDING) -> torch.Tensor | None:
    """Random crop offsets and flips for ``n`` images, drawn on the CPU from ``generator`` (so the
    draws are the same on every device): int64 ``[n, 3]`` of ``(row offset, column offset, flip)``,
    offsets in ``[0, 2 * padding]``, flip in ``{0, 1}`` (always 0 for ``crop``). None for ``none``.

    Raises ValueError for a kind outside :data:`AUGMENTATIONS`.
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; use one of {', '.join(AUGMENTATIONS)}")
    if kind == "none":
        return None
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.randint(0, 2, (n, 1), generator=generator) if kind == "crop+flip" else torch.zeros(n, 1, dtype=torch.long)
    return torch.cat([offsets, flips], dim=1)


def augment_batch(x: torch.Tensor, params: torch.Tensor, padding: int = CROP_PADDING) -> torch.Tensor:
    """Random crop with zero padding then horizontal flip, as torchvision's ``RandomCrop(size,
    padding)`` + ``RandomHorizontalFlip`` do per image, for a whole batch in one gather on ``x``'s device.

    ``x`` ``[B, C, H, W]``; ``params`` ``[B, 3]`` rows from :func:`draw_augmentation`: image ``b`` is
    the ``H x W`` window at ``(row, col)`` of ``x[b]`` zero-padded by ``padding`` on every side,
    mirrored left-right when ``flip`` is 1. Returns a new ``[B, C, H, W]`` tensor.
    """
    b, c, h, w = x.shape
    params = params.to(x.device)
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    rows = params[:, 0:1] + torch.arange(h, device=x.device)                       # [B, H]
    cols = torch.arange(w, device=x.device).expand(b, w)
    cols = params[:, 1:2] + torch.where(params[:, 2:3].bool(), w - 1 - cols, cols)  # [B, W], mirrored if flipped
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
