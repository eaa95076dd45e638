"""Datasets held in memory as tensors, and a fast minibatch iterator.

The small image benchmarks used with the LC algorithm (MNIST, Fashion-MNIST,
CIFAR-10) fit comfortably in memory, so they are loaded once into float32
tensors and minibatches are produced by indexing those tensors with a random
permutation; there is no per-sample Python work and no DataLoader.

Data files are never downloaded.  They are looked up in an explicit
``data_dir`` argument (only there, when it is given), or else in
``$LCOMPRESS_DATA`` and in ``/usr/share/datasets/<name>`` (where the Debian
package ``dataset-fashion-mnist`` installs Fashion-MNIST).
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import os
import pickle
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

ENV_VAR = "LCOMPRESS_DATA"
SYSTEM_DATA_ROOT = Path("/usr/share/datasets")

__all__ = [
    "Dataset",
    "read_idx",
    "find_data_dir",
    "load_mnist_like",
    "load_mnist",
    "load_fashion_mnist",
    "load_cifar10",
    "batches",
    "augment_cifar",
    "ENV_VAR",
]


class Dataset(NamedTuple):
    """A train/test split held in memory.

    ``x_*`` are float32 tensors of shape (N, C, H, W); ``y_*`` are int64
    class labels of shape (N,).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


# ---------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------

# IDX type code -> big-endian numpy dtype of the stored elements.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        if head == b"\x1f\x8b":  # gzip magic, whatever the file is called
            try:
                with gzip.GzipFile(fileobj=f) as g:
                    return g.read()
            except (OSError, EOFError) as exc:
                raise ValueError(f"{path}: corrupt gzip stream ({exc})") from exc
        return f.read()


def read_idx(path: PathLike) -> torch.Tensor:
    """Read an IDX file (as used by MNIST) into a tensor.

    The header is two zero bytes, a type code (0x08 uint8, 0x09 int8,
    0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), the number of
    dimensions, then each dimension as a big-endian uint32; the data follow
    in row-major big-endian order.  Gzip-compressed files are detected by
    their content and decompressed transparently.

    Raises ``ValueError`` naming the file if the header is invalid or the
    size does not match the dimensions.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: not an IDX file (bad magic number 0x{raw[:4].hex()}; "
            "expected 0x0000TTNN with a known type code TT)"
        )
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions declared)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(shape) * dtype.itemsize
    actual = len(raw) - header
    if actual != expected:
        raise ValueError(
            f"{path}: IDX size mismatch: shape {shape} of {dtype.name} needs "
            f"{expected} data bytes, file has {actual}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    # Convert to native byte order (and a writable copy) for torch.
    return torch.from_numpy(arr.astype(dtype.newbyteorder("="), copy=True))


# ---------------------------------------------------------------------------
# Locating data
# ---------------------------------------------------------------------------

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)

_KNOWN = {
    "fashion-mnist": _MNIST_FILES,
    "mnist": _MNIST_FILES,
    "cifar10": _CIFAR10_FILES,
}

_HOW_TO_GET = {
    "fashion-mnist": (
        "install the Debian package (apt-get install -y dataset-fashion-mnist), "
        "or put the four IDX files (" + ", ".join(f + "[.gz]" for f in _MNIST_FILES) + ") "
        f"in a directory given as --data-dir / data_dir=, or in ${ENV_VAR}"
    ),
    "mnist": (
        "put the four MNIST IDX files ("
        + ", ".join(f + "[.gz]" for f in _MNIST_FILES)
        + f") in a directory given as --data-dir / data_dir=, or in ${ENV_VAR}"
    ),
    "cifar10": (
        "extract the python version of CIFAR-10 (cifar-10-python.tar.gz) and give "
        "the cifar-10-batches-py directory (or its parent) as --data-dir / root=, "
        f"or put it in ${ENV_VAR}"
    ),
}


def _resolve(directory: Path, stem: str) -> Optional[Path]:
    """Find ``stem`` in ``directory`` as plain or .gz file, also accepting
    the ``train-images.idx3-ubyte`` spelling used by some mirrors."""
    variants = [stem]
    if "-idx" in stem:
        variants.append(stem.replace("-idx", ".idx"))
    for v in variants:
        for suffix in ("", ".gz"):
            p = directory / (v + suffix)
            if p.is_file():
                return p
    return None


def _candidates(name: str, data_dir: Optional[PathLike]) -> list[Path]:
    out: list[Path] = []
    subdirs = [name]
    if name == "cifar10":
        subdirs = ["cifar-10-batches-py", "cifar10", "cifar10/cifar-10-batches-py"]
    if data_dir is not None:  # an explicit directory is the only place looked: no silent fallback elsewhere
        base = Path(data_dir).expanduser()
        out.append(base)
        out.extend(base / s for s in subdirs)
        return out
    env = os.environ.get(ENV_VAR)
    if env:
        base = Path(env).expanduser()
        out.append(base)
        out.extend(base / s for s in subdirs)
    out.extend(SYSTEM_DATA_ROOT / s for s in subdirs)
    return out


def find_data_dir(name: str, data_dir: Optional[PathLike] = None) -> Path:
    """Return the directory holding the files of dataset ``name``.

    ``name`` is ``"fashion-mnist"``, ``"mnist"`` or ``"cifar10"``.  With
    ``data_dir``, only ``data_dir`` and ``data_dir/<name>`` are searched (a
    directory given explicitly that lacks the files is an error, never a
    reason to take the data from somewhere else).  Without it, in order:
    ``$LCOMPRESS_DATA`` and ``$LCOMPRESS_DATA/<name>``;
    ``/usr/share/datasets/<name>``.  The first directory holding all the
    required files wins.

    Raises ``FileNotFoundError`` listing every place looked and how to get
    the data (first of all when ``data_dir`` is not a directory);
    ``ValueError`` for an unknown dataset name.
    """
    if name not in _KNOWN:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(_KNOWN))}")
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise FileNotFoundError(f"{str(data_dir)!r} is not a directory (no such directory to read dataset {name!r} from)")
    looked: list[str] = []
    for d in _candidates(name, data_dir):
        missing = [f for f in _KNOWN[name] if _resolve(d, f) is None]
        if not missing:
            logger.debug("dataset %s found in %s", name, d)
            return d
        if d.is_dir():
            looked.append(f"  {d} (missing: {', '.join(missing)})")
        else:
            looked.append(f"  {d} (no such directory)")
    raise FileNotFoundError(
        f"dataset {name!r} not found. Looked in:\n"
        + "\n".join(looked)
        + f"\nTo get it: {_HOW_TO_GET[name]}."
    )


# ---------------------------------------------------------------------------
# MNIST-like
# ---------------------------------------------------------------------------


def load_mnist_like(name: str, data_dir: Optional[PathLike] = None) -> Dataset:
    """Load MNIST or Fashion-MNIST as a :class:`Dataset`.

    Images are returned with shape (N, 1, 28, 28), scaled to [0, 1] and then
    centred by subtracting the per-pixel mean of the training set (from both
    train and test images), as in the LC papers.  Labels are int64.
    """
    d = find_data_dir(name, data_dir)
    files = [_resolve(d, f) for f in _MNIST_FILES]
    xtr, ytr, xte, yte = (read_idx(p) for p in files)  # type: ignore[arg-type]
    for x, y, p in ((xtr, ytr, files[0]), (xte, yte, files[2])):
        if x.dim() != 3 or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"{p}: unexpected shapes images {tuple(x.shape)} / labels {tuple(y.shape)}"
            )
    xtr = xtr.unsqueeze(1).to(torch.float32).div_(255.0)
    xte = xte.unsqueeze(1).to(torch.float32).div_(255.0)
    mean = xtr.mean(dim=0, keepdim=True)
    xtr.sub_(mean)
    xte.sub_(mean)
    logger.info("loaded %s from %s: %d train, %d test", name, d, len(ytr), len(yte))
    return Dataset(xtr, ytr.to(torch.int64), xte, yte.to(torch.int64))


def load_fashion_mnist(data_dir: Optional[PathLike] = None) -> Dataset:
    """Fashion-MNIST, see :func:`load_mnist_like`."""
    return load_mnist_like("fashion-mnist", data_dir)


def load_mnist(data_dir: Optional[PathLike] = None) -> Dataset:
    """MNIST, see :func:`load_mnist_like`."""
    return load_mnist_like("mnist", data_dir)


# ---------------------------------------------------------------------------
# CIFAR-10 (python pickle batches), with a restricted unpickler
# ---------------------------------------------------------------------------


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore
    return _reconstruct


def _codecs_encode():
    import codecs

    return codecs.encode


# (module, name) -> zero-argument function returning the object.  Resolving
# by hand (rather than importing the module named in the pickle) keeps the
# deprecated ``numpy.core`` alias out of the picture on numpy 2.
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], object]] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    # Python 3 pickles of bytes with protocol < 3 use _codecs.encode.
    ("_codecs", "encode"): _codecs_encode,
}
for _mod in ("builtins", "__builtin__"):
    for _name, _obj in (
        ("dict", dict),
        ("list", list),
        ("tuple", tuple),
        ("bytes", bytes),
        ("bytearray", bytearray),
        ("str", str),
        ("int", int),
        ("float", float),
    ):
        _ALLOWED_GLOBALS[(_mod, _name)] = (lambda o=_obj: o)
del _mod, _name, _obj


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler accepting only plain containers and numpy arrays.

    Any other global referenced by the pickle (a function, a class) is
    refused with :class:`pickle.UnpicklingError`, so a malicious file cannot
    run code when loaded.
    """

    def find_class(self, module: str, name: str):  # noqa: D102
        fn = _ALLOWED_GLOBALS.get((module, name))
        if fn is None:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global {module}.{name}: only builtin containers "
                "and numpy arrays are allowed in dataset files"
            )
        return fn()


def restricted_load(path: PathLike):
    """Load a pickle file with :class:`RestrictedUnpickler`.

    Python 2 pickles (such as the CIFAR-10 batches) are read with
    ``encoding="bytes"``, so their string keys come back as bytes.
    """
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise pickle.UnpicklingError(f"{path}: {exc}") from exc


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    obj = restricted_load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict in CIFAR batch, got {type(obj).__name__}")
    data = obj.get(b"data", obj.get("data"))
    labels = obj.get(b"labels", obj.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: CIFAR batch lacks 'data' or 'labels'")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: CIFAR data must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    return data, labels


def load_cifar10(root: Optional[PathLike] = None) -> Dataset:
    """Load CIFAR-10 from the python pickle batches.

    ``root`` is the ``cifar-10-batches-py`` directory or a directory
    containing it; if ``None`` it is searched for as in
    :func:`find_data_dir` (``$LCOMPRESS_DATA``, ``/usr/share/datasets``).
    The files are read with a restricted unpickler (see
    :class:`RestrictedUnpickler`).

    Images are returned as float32 (N, 3, 32, 32), scaled to [0, 1] and
    normalised per channel with the training-set mean and standard
    deviation; labels are int64.
    """
    d = find_data_dir("cifar10", root)
    parts = [_read_cifar_batch(d / f"data_batch_{i}") for i in range(1, 6)]
    xtr_u8 = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xte_u8, yte = _read_cifar_batch(d / "test_batch")
    xtr = torch.from_numpy(xtr_u8).reshape(-1, 3, 32, 32).to(torch.float32).div_(255.0)
    xte = torch.from_numpy(xte_u8).reshape(-1, 3, 32, 32).to(torch.float32).div_(255.0)
    mean = xtr.mean(dim=(0, 2, 3), keepdim=True)
    std = xtr.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)
    xtr.sub_(mean).div_(std)
    xte.sub_(mean).div_(std)
    logger.info("loaded cifar10 from %s: %d train, %d test", d, len(ytr), len(yte))
    return Dataset(xtr, torch.from_numpy(ytr), xte, torch.from_numpy(yte))


# ---------------------------------------------------------------------------
# Minibatches and augmentation
# ---------------------------------------------------------------------------


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: bool = True,
    generator: Optional[torch.Generator] = None,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield minibatches ``(xb, yb)`` covering one epoch of ``(x, y)``.

    With ``shuffle`` the order is a ``torch.randperm`` drawn from
    ``generator`` (the global RNG if ``None``); each batch is gathered with a
    single index operation.  Every sample appears exactly once per epoch
    (the last, smaller batch is dropped if ``drop_last``).

    Distributed use: each of ``world_size`` ranks passes its ``rank`` and a
    generator seeded identically on every rank, so all ranks draw the same
    permutation; rank ``r`` takes elements ``r, r + world_size, ...`` of it.
    The permutation is first cut to a multiple of ``world_size`` (dropping at
    most ``world_size - 1`` samples per epoch, different ones each epoch when
    shuffled) so that all ranks get the same number of batches.  Shards are
    disjoint.  ``batch_size`` is the per-rank batch size.
    """
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x has {n} samples but y has {y.shape[0]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world_size {world_size}")
    if shuffle and world_size > 1 and generator is None:
        raise ValueError(
            "sharded shuffling needs a generator seeded identically on every rank"
        )
    if shuffle:
        perm = torch.randperm(n, generator=generator)
    else:
        perm = torch.arange(n)
    if world_size > 1:
        perm = perm[: (n // world_size) * world_size][rank::world_size]
    perm = perm.to(x.device)
    m = perm.shape[0]
    stop = (m // batch_size) * batch_size if drop_last else m
    for start in range(0, stop, batch_size):
        idx = perm[start : start + batch_size]
        yield x[idx], y[idx.to(y.device)]


def augment_cifar(
    xb: torch.Tensor, generator: Optional[torch.Generator] = None, padding: int = 4
) -> torch.Tensor:
    """Random crop (after zero padding by ``padding`` pixels) and random
    horizontal flip of a batch of images (N, C, H, W), vectorized.

    Zero padding is applied to the already normalised images, i.e. it pads
    with the mean colour.  The random numbers come from ``generator`` (CPU)
    or the global RNG.  Returns a new tensor; ``xb`` is not modified.
    """
    n, c, h, w = xb.shape
    dev = xb.device
    padded = F.pad(xb, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    ar_h = torch.arange(h)
    ar_w = torch.arange(w)
    rows = (oy[:, None] + ar_h[None, :]).to(dev)  # (N, H)
    cols_base = torch.where(flip[:, None], (w - 1) - ar_w[None, :], ar_w[None, :])
    cols = (ox[:, None] + cols_base).to(dev)  # (N, W)
    ni = torch.arange(n, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return padded[ni, ci, rows[:, None, :, None], cols[:, None, None, :]]
