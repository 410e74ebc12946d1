"""Dataset readers and data-dir resolution (pytest_advprune.data).

CIFAR-10 and SVHN are tested on tiny files written here in torchvision's on-disk formats;
Fashion-MNIST also on the real Debian package files (test split, ``limit=`` keeps it fast).
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from pytest_advprune import data
from pytest_advprune.errors import DatasetNotFound

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated_resolution(monkeypatch, tmp_path):
    """No test sees the caller's ADVPRUNE_DATA_DIR; the Debian root is an empty folder unless a
    test points it elsewhere."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    empty = tmp_path / "no-debian"
    empty.mkdir()
    monkeypatch.setattr(data, "DEBIAN_ROOT", empty)


# ----------------------------------------------------------------------------- idx writer


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx encoding of a uint8 array (magic 0x0000 0x08 ndim, big-endian dims, payload)."""
    assert array.dtype == np.uint8
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def write_fmnist(folder: Path, images: np.ndarray, labels: np.ndarray, train: bool = False, gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    stem = "train" if train else "t10k"
    write_idx(folder / f"{stem}-images-idx3-ubyte{ext}", images.astype(np.uint8))
    write_idx(folder / f"{stem}-labels-idx1-ubyte{ext}", labels.astype(np.uint8))
    return folder


def tiny_fmnist(folder: Path, label: int, n: int = 3, train: bool = False) -> Path:
    """``n`` images whose every pixel and label is ``label`` (tells the folders apart)."""
    return write_fmnist(folder, np.full((n, 28, 28), label, np.uint8), np.full(n, label, np.uint8), train)


# ----------------------------------------------------------------------------- idx reader


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    gz=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_read_idx_round_trip(tmp_path_factory, shape, gz, seed):
    arr = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    path = write_idx(tmp_path_factory.mktemp("idx") / ("a.idx.gz" if gz else "a.idx"), arr)
    out = data.read_idx(path)
    assert out.dtype == np.uint8 and out.shape == arr.shape
    assert np.array_equal(out, arr)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("cut", [1, 100, 28 * 28])
def test_read_idx_truncated_payload(tmp_path, gz, cut):
    raw = idx_bytes(np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(2, 28, 28))[:-cut]
    path = tmp_path / ("x.gz" if gz else "x")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(path)


@pytest.mark.parametrize("keep", [0, 3, 6, 10, 15], ids=lambda k: f"first{k}bytes")
def test_read_idx_truncated_header_raises_value_error(tmp_path, keep):
    """A file cut inside its header is a truncated file too: ValueError, not struct.error."""
    path = tmp_path / "x"
    path.write_bytes(idx_bytes(np.zeros((2, 4, 4), np.uint8))[:keep])
    with pytest.raises(ValueError):
        data.read_idx(path)


@pytest.mark.parametrize("keep_fraction", [0.3, 0.9])
def test_read_idx_truncated_gzip_raises_value_error(tmp_path, keep_fraction):
    """A .gz download cut short (the common corruption): ValueError, not EOFError."""
    blob = gzip.compress(idx_bytes(np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8)))
    path = tmp_path / "x.gz"
    path.write_bytes(blob[: int(len(blob) * keep_fraction)])
    with pytest.raises(ValueError):
        data.read_idx(path)


def test_read_idx_rejects_other_files(tmp_path):
    good = idx_bytes(np.zeros((2, 3), np.uint8))
    for name, raw in {
        "float-idx": bytes([0, 0, 0x0D]) + good[3:],
        "bad-magic": b"\x01" + good[1:],
        "trailing-bytes": good + b"\x00",
        "empty": b"",
    }.items():
        path = tmp_path / name
        path.write_bytes(raw)
        with pytest.raises(ValueError):
            data.read_idx(path)


# ----------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.skipif(not REAL_FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_fashion_mnist_from_debian_folder(monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_ROOT", REAL_FMNIST.parent)
    x, y = data.load("fashion_mnist", train=False, limit=50)
    assert x.dtype == torch.float32 and x.shape == (50, 1, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (50,)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.max()) > 0.5
    assert int(y.min()) >= 0 and int(y.max()) <= 9
    assert len(set(y.tolist())) > 5
    # pixel values are the raw bytes / 255, in file order
    raw = np.frombuffer(gzip.decompress((REAL_FMNIST / "t10k-images-idx3-ubyte.gz").read_bytes())[16:], np.uint8)
    labels = np.frombuffer(gzip.decompress((REAL_FMNIST / "t10k-labels-idx1-ubyte.gz").read_bytes())[8:], np.uint8)
    assert torch.equal(x, torch.from_numpy(raw[: 50 * 784].reshape(50, 1, 28, 28).astype(np.float32)) / 255)
    assert y.tolist() == labels[:50].tolist()
    assert y[:3].tolist() == [9, 2, 1]  # ankle boot, pullover, trouser: the published t10k order


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
@pytest.mark.parametrize("layout", ["flat", "FashionMNIST/raw", "fashion-mnist"])
def test_fashion_mnist_layouts_and_scaling(tmp_path, gz, layout):
    root = tmp_path / "data"
    folder = root if layout == "flat" else root / layout
    images = np.zeros((4, 28, 28), np.uint8)
    images[:, 0, 0] = [0, 1, 254, 255]
    images[1, 27, 3] = 51
    write_fmnist(folder, images, np.array([0, 9, 3, 4]), train=True, gz=gz)
    x, y = data.load("fashion_mnist", train=True, data_dir=root)
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x[:, 0, 0, 0], torch.tensor([0.0, 1.0, 254.0, 255.0]) / 255)
    assert x[:, 0, 0, 0].tolist()[::3] == [0.0, 1.0]
    assert x[1, 0, 27, 3].item() == np.float32(51) / np.float32(255)
    assert int((x != 0).sum()) == 4
    assert y.tolist() == [0, 9, 3, 4] and y.dtype == torch.int64
    x2, _ = data.load("fashion_mnist", train=True, data_dir=root, limit=2)
    assert torch.equal(x2, x[:2])
    with pytest.raises(DatasetNotFound):  # only the train split is there
        data.load("fashion_mnist", train=False, data_dir=root)


def test_fashion_mnist_image_label_count_mismatch(tmp_path):
    write_fmnist(tmp_path, np.zeros((3, 28, 28), np.uint8), np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="labels"):
        data.load("fashion_mnist", train=False, data_dir=tmp_path)


# ----------------------------------------------------------------------------- CIFAR-10


class _Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the original CIFAR-10 batches (protocol 2, byte
    strings as BINSTRING, ``numpy.core.multiarray._reconstruct``)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        b = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(b) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(b)) + b)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def cifar_images(n: int, offset: int) -> np.ndarray:
    """``n`` distinct images as CIFAR rows: uint8 [n, 3072], every value a function of its index."""
    i = np.arange(n * 3072, dtype=np.int64).reshape(n, 3072)
    return ((i * 7 + offset * 31) % 256).astype(np.uint8)


def batch_dict(images: np.ndarray, labels: list[int], name: str) -> dict:
    return {
        "batch_label": f"{name} of 5",
        "labels": labels,
        "data": images,
        "filenames": [f"img_{j}.png" for j in range(len(labels))],
    }


def write_cifar(root: Path, dump=py2_pickle, n_per_batch: int = 2) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        images = cifar_images(n_per_batch, offset=k)
        labels = [(k + j) % 10 for j in range(n_per_batch)]
        (folder / name).write_bytes(dump(batch_dict(images, labels, name)))
        written[name] = (images, labels)
    return written


def test_cifar10_pixel_order_and_values(tmp_path):
    written = write_cifar(tmp_path)
    x, y = data.load("cifar10", train=False, data_dir=tmp_path)
    images, labels = written["test_batch"]
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert y.tolist() == labels and y.dtype == torch.int64
    # a CIFAR row is 1024 red, then 1024 green, then 1024 blue values, each plane row-major
    for n in range(2):
        for c, h, w in [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (2, 31, 31), (1, 17, 5)]:
            assert x[n, c, h, w].item() == images[n, c * 1024 + h * 32 + w] / np.float32(255)
    expected = torch.from_numpy(images.reshape(2, 3, 32, 32).astype(np.float32)) / 255
    assert torch.equal(x, expected)
    xt, yt = data.load("cifar10", train=True, data_dir=tmp_path)
    assert xt.shape == (10, 3, 32, 32)
    order = [f"data_batch_{i}" for i in range(1, 6)]
    assert yt.tolist() == sum((written[b][1] for b in order), [])
    assert torch.equal(xt[2:4], torch.from_numpy(written["data_batch_2"][0].reshape(2, 3, 32, 32).astype(np.float32)) / 255)
    xl, _ = data.load("cifar10", train=True, data_dir=tmp_path, limit=3)
    assert torch.equal(xl, xt[:3])


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar10_batches_pickled_by_python3(tmp_path, protocol):
    """Batches re-saved with ``pickle.dump`` (any protocol) are ordinary numpy pickles; torchvision
    reads them, so must we."""
    written = write_cifar(tmp_path, dump=lambda obj: pickle.dumps(obj, protocol=protocol))
    x, y = data.load("cifar10", train=False, data_dir=tmp_path)
    images, labels = written["test_batch"]
    assert y.tolist() == labels
    assert torch.equal(x, torch.from_numpy(images.reshape(2, 3, 32, 32).astype(np.float32)) / 255)


class _Exploit:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _ExploitWrite:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("payload", ["system", "exec"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar10_malicious_pickle_is_refused(tmp_path, payload, protocol):
    root = tmp_path / "data"
    write_cifar(root)
    marker = tmp_path / "marker"
    evil = _Exploit(f"touch {marker}") if payload == "system" else _ExploitWrite(str(marker))
    entry = batch_dict(cifar_images(2, 0), [0, 1], "test_batch")
    entry["data"] = evil
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(entry, protocol=protocol))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data.load("cifar10", train=False, data_dir=root)
    assert not marker.exists(), "the pickle's code ran"
    # also when the payload is the whole file
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(evil, protocol=protocol))
    with pytest.raises(pickle.UnpicklingError):
        data.load("cifar10", train=False, data_dir=root)
    assert not marker.exists(), "the pickle's code ran"


def test_cifar10_missing_batch_is_not_found(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    data.load("cifar10", train=False, data_dir=tmp_path)  # the test split is still complete
    with pytest.raises(DatasetNotFound):
        data.load("cifar10", train=True, data_dir=tmp_path)


# ----------------------------------------------------------------------------- SVHN


def test_svhn_mat_layout_and_label_10_is_digit_0(tmp_path):
    import scipy.io

    n = 4
    X = (np.arange(32 * 32 * 3 * n, dtype=np.int64).reshape(32, 32, 3, n) * 13 % 256).astype(np.uint8)
    y = np.array([[10], [1], [9], [10]], dtype=np.uint8)
    scipy.io.savemat(str(tmp_path / "test_32x32.mat"), {"X": X, "y": y})
    x_t, y_t = data.load("svhn", train=False, data_dir=tmp_path)
    assert x_t.shape == (n, 3, 32, 32) and x_t.dtype == torch.float32
    assert y_t.tolist() == [0, 1, 9, 0] and y_t.dtype == torch.int64
    for i, c, h, w in [(0, 0, 0, 0), (1, 2, 31, 0), (3, 1, 5, 30), (2, 0, 0, 1), (2, 0, 1, 0)]:
        assert x_t[i, c, h, w].item() == X[h, w, c, i] / np.float32(255)
    assert torch.equal(x_t, torch.from_numpy(X.transpose(3, 2, 0, 1).astype(np.float32)) / 255)
    with pytest.raises(DatasetNotFound):
        data.load("svhn", train=True, data_dir=tmp_path)


# ----------------------------------------------------------------------------- resolution


def first_label(**kwargs) -> int:
    return int(data.load("fashion_mnist", train=False, **kwargs)[1][0])


def test_data_dir_resolution_order(tmp_path, monkeypatch):
    explicit = tiny_fmnist(tmp_path / "explicit", 1)
    env = tiny_fmnist(tmp_path / "env", 2)
    debian = tmp_path / "debian"
    tiny_fmnist(debian / "fashion-mnist", 3)
    monkeypatch.setattr(data, "DEBIAN_ROOT", debian)
    assert first_label() == 3
    monkeypatch.setenv(data.ENV_VAR, str(env))
    assert first_label() == 2
    assert first_label(data_dir=explicit) == 1
    assert first_label(data_dir=str(explicit)) == 1
    assert data.candidate_dirs("fashion_mnist", explicit) == [explicit, env, debian / "fashion-mnist"]
    # a place without the files is passed over
    empty = tmp_path / "empty"
    empty.mkdir()
    assert first_label(data_dir=empty) == 2
    monkeypatch.setenv(data.ENV_VAR, str(empty))
    assert first_label(data_dir=empty) == 3
    monkeypatch.setenv(data.ENV_VAR, "")
    assert data.candidate_dirs("fashion_mnist", None) == [debian / "fashion-mnist"]


def test_debian_folder_name_uses_dashes(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_ROOT", tmp_path)
    assert data.candidate_dirs("fashion_mnist", None) == [tmp_path / "fashion-mnist"]
    assert data.candidate_dirs("cifar10", None) == [tmp_path / "cifar10"]


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10", "svhn"])
@pytest.mark.parametrize("train", [True, False])
def test_missing_dataset_is_one_line_error(tmp_path, monkeypatch, name, train):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env"))
    with pytest.raises(DatasetNotFound) as info:
        data.load(name, train=train, data_dir=tmp_path / "explicit")
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg
    assert "--advprune-data-dir" in msg and "ADVPRUNE_DATA_DIR" in msg
    assert name in msg and ("train" if train else "test") in msg
    assert str(tmp_path / "explicit") in msg and str(tmp_path / "env") in msg
    if name == "fashion_mnist":
        assert "apt-get install dataset-fashion-mnist" in msg
    else:
        assert "apt-get" not in msg


def test_failed_download_is_still_one_line(tmp_path, monkeypatch):
    def offline(name, root, train):
        raise OSError("no route to host\nTraceback-ish second line")

    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(DatasetNotFound) as info:
        data.load("cifar10", train=False, download_dir=tmp_path / "dl")
    msg = str(info.value)
    assert "\n" not in msg
    assert "download failed: OSError: no route to host" in msg
    assert "--advprune-data-dir" in msg and "ADVPRUNE_DATA_DIR" in msg


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(KeyError) as info:
        data.load("mnist", train=False, data_dir=tmp_path)
    assert "'mnist'" in str(info.value) and "fashion_mnist, cifar10, svhn" in str(info.value)  # names the known ones
    with pytest.raises(KeyError):
        data.load("cifar100", train=True)
