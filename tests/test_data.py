import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from lcompress import data as D
from lcompress.data import (
    Dataset,
    augment_cifar,
    batches,
    find_data_dir,
    load_cifar10,
    load_fashion_mnist,
    load_mnist,
    read_idx,
)


def write_idx(path, arr, code=0x08, gz=False):
    arr = np.asarray(arr)
    be = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    payload = bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    payload += arr.astype(be).tobytes()
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(payload)


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    """Isolate the search path from the machine: no $LCOMPRESS_DATA and an
    empty system data root."""
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    monkeypatch.setattr(D, "SYSTEM_DATA_ROOT", tmp_path / "system-empty")


# --------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_uint8_roundtrip(tmp_path, gz):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    p = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(p, arr, gz=gz)
    t = read_idx(p)
    assert t.dtype == torch.uint8
    assert tuple(t.shape) == (5, 7, 3)
    assert np.array_equal(t.numpy(), arr)


@pytest.mark.parametrize(
    "code,dtype,torch_dtype",
    [(0x0B, np.int16, torch.int16), (0x0C, np.int32, torch.int32),
     (0x0D, np.float32, torch.float32), (0x0E, np.float64, torch.float64),
     (0x09, np.int8, torch.int8)],
)
def test_read_idx_multibyte_big_endian(tmp_path, code, dtype, torch_dtype):
    arr = (np.arange(12).reshape(3, 4) * 37 - 100).astype(dtype)
    p = tmp_path / "b.idx"
    write_idx(p, arr, code=code)
    t = read_idx(p)
    assert t.dtype == torch_dtype
    assert np.array_equal(t.numpy(), arr)


def test_read_idx_bad_magic_names_file(tmp_path):
    p = tmp_path / "bad.idx"
    p.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(ValueError, match="bad.idx.*magic"):
        read_idx(p)
    p2 = tmp_path / "badtype.idx"
    p2.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(ValueError, match="badtype.idx"):
        read_idx(p2)


def test_read_idx_size_mismatch(tmp_path):
    p = tmp_path / "short.idx.gz"
    with gzip.open(p, "wb") as f:
        f.write(b"\x00\x00\x08\x02" + struct.pack(">II", 4, 4) + b"x" * 15)
    with pytest.raises(ValueError, match="short.idx.gz.*mismatch"):
        read_idx(p)


# ------------------------------------------------------------ MNIST-like


def make_mnist_dir(d, n_train=6, n_test=4, gz=True, seed=0):
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    xtr = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    ytr = rng.integers(0, 10, size=n_train, dtype=np.uint8)
    xte = rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8)
    yte = rng.integers(0, 10, size=n_test, dtype=np.uint8)
    sfx = ".gz" if gz else ""
    write_idx(d / ("train-images-idx3-ubyte" + sfx), xtr, gz=gz)
    write_idx(d / ("train-labels-idx1-ubyte" + sfx), ytr, gz=gz)
    write_idx(d / ("t10k-images-idx3-ubyte" + sfx), xte, gz=gz)
    write_idx(d / ("t10k-labels-idx1-ubyte" + sfx), yte, gz=gz)
    return xtr, ytr, xte, yte


@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_mnist_contents(tmp_path, no_env, gz):
    xtr, ytr, xte, yte = make_mnist_dir(tmp_path / "fm", gz=gz)
    ds = load_fashion_mnist(tmp_path / "fm")
    assert isinstance(ds, Dataset)
    assert ds.x_train.shape == (6, 1, 28, 28) and ds.x_test.shape == (4, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    mean = xtr.astype(np.float64).mean(axis=0) / 255.0
    expect_tr = xtr / 255.0 - mean
    expect_te = xte / 255.0 - mean
    np.testing.assert_allclose(ds.x_train[:, 0].numpy(), expect_tr, atol=1e-6)
    np.testing.assert_allclose(ds.x_test[:, 0].numpy(), expect_te, atol=1e-6)
    assert np.array_equal(ds.y_train.numpy(), ytr.astype(np.int64))
    assert np.array_equal(ds.y_test.numpy(), yte.astype(np.int64))
    # training images are centred per pixel
    assert ds.x_train.mean(0).abs().max().item() < 1e-6


def test_find_data_dir_search_order(tmp_path, monkeypatch):
    sysroot = tmp_path / "sys"
    monkeypatch.setattr(D, "SYSTEM_DATA_ROOT", sysroot)
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    make_mnist_dir(sysroot / "mnist")
    assert find_data_dir("mnist") == sysroot / "mnist"
    envroot = tmp_path / "env"
    make_mnist_dir(envroot / "mnist")
    monkeypatch.setenv(D.ENV_VAR, str(envroot))
    assert find_data_dir("mnist") == envroot / "mnist"
    explicit = tmp_path / "explicit"
    make_mnist_dir(explicit)
    assert find_data_dir("mnist", explicit) == explicit
    # data_dir/<name> is also accepted
    assert find_data_dir("mnist", envroot) == envroot / "mnist"


def test_load_mnist_via_env_and_dotted_names(tmp_path, monkeypatch, no_env):
    d = tmp_path / "env" / "mnist"
    make_mnist_dir(d, gz=False)
    for f in list(d.iterdir()):
        f.rename(d / f.name.replace("-idx", ".idx"))
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path / "env"))
    ds = load_mnist()
    assert ds.x_train.shape[0] == 6 and ds.y_test.shape == (4,)


def test_missing_files_message(tmp_path, no_env):
    partial = tmp_path / "partial"
    partial.mkdir()
    write_idx(partial / "train-images-idx3-ubyte.gz", np.zeros((1, 28, 28), np.uint8), gz=True)
    with pytest.raises(FileNotFoundError) as ei:
        load_fashion_mnist(partial)
    msg = str(ei.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg
    assert str(partial) in msg
    assert "t10k-labels-idx1-ubyte" in msg
    assert "LCOMPRESS_DATA" in msg
    assert "system-empty" not in msg  # an explicit directory is the only place looked


def test_an_explicit_data_dir_never_falls_back_elsewhere(tmp_path, monkeypatch):
    """A data_dir that does not exist, or lacks the files, is an error even when complete copies of the dataset
    are in $LCOMPRESS_DATA and the system root: the user asked for that directory."""
    sysroot, envroot = tmp_path / "sys", tmp_path / "env"
    make_mnist_dir(sysroot / "fashion-mnist")
    make_mnist_dir(envroot / "fashion-mnist")
    monkeypatch.setattr(D, "SYSTEM_DATA_ROOT", sysroot)
    monkeypatch.setenv(D.ENV_VAR, str(envroot))
    assert find_data_dir("fashion-mnist") == envroot / "fashion-mnist"  # without data_dir: the search path
    missing = tmp_path / "nonexistent"
    with pytest.raises(FileNotFoundError, match="is not a directory") as ei:
        load_fashion_mnist(missing)
    assert str(missing) in str(ei.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as ei:
        find_data_dir("fashion-mnist", empty)
    assert str(empty) in str(ei.value) and str(envroot) not in str(ei.value) and str(sysroot) not in str(ei.value)


def test_find_data_dir_unknown():
    with pytest.raises(ValueError, match="unknown dataset"):
        find_data_dir("imagenet")


# ---------------------------------------------------------------- CIFAR


def make_cifar_dir(root, n_per=4, protocol=2, seed=0):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        x = rng.integers(0, 256, size=(n_per, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=n_per)]
        obj = {b"batch_label": name.encode(), b"labels": y, b"data": x,
               b"filenames": [b"f%d.png" % i for i in range(n_per)]}
        with open(d / name, "wb") as f:
            pickle.dump(obj, f, protocol=protocol)
        xs.append(x)
        ys.append(y)
    return xs, ys


@pytest.mark.parametrize("protocol", [2, 4])
def test_load_cifar10_contents(tmp_path, no_env, protocol):
    xs, ys = make_cifar_dir(tmp_path, protocol=protocol)
    ds = load_cifar10(tmp_path)  # parent of cifar-10-batches-py
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.y_train.dtype == torch.int64
    assert ds.y_train.tolist() == sum(ys[:5], [])
    assert ds.y_test.tolist() == ys[5]
    raw = np.concatenate(xs[:5]).reshape(-1, 3, 32, 32) / 255.0
    mean = raw.mean(axis=(0, 2, 3), keepdims=True)
    std = raw.std(axis=(0, 2, 3), keepdims=True, ddof=1)
    np.testing.assert_allclose(ds.x_train.numpy(), (raw - mean) / std, atol=1e-4)
    raw_te = xs[5].reshape(-1, 3, 32, 32) / 255.0
    np.testing.assert_allclose(ds.x_test.numpy(), (raw_te - mean) / std, atol=1e-4)
    # also accepts the batches directory itself
    ds2 = load_cifar10(tmp_path / "cifar-10-batches-py")
    assert torch.equal(ds2.x_test, ds.x_test)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_code(tmp_path, no_env):
    make_cifar_dir(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    with open(bad, "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing.*system") as ei:
        load_cifar10(tmp_path)
    assert "data_batch_3" in str(ei.value)


def test_restricted_unpickler_refuses_arbitrary_class(tmp_path):
    p = tmp_path / "x.pkl"
    with open(p, "wb") as f:
        pickle.dump({"a": torch.nn.Linear}, f, protocol=4)
    with pytest.raises(pickle.UnpicklingError, match="torch"):
        D.restricted_load(p)


def test_missing_cifar_message(tmp_path, no_env):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_cifar10(tmp_path)


# -------------------------------------------------------------- batches


def test_batches_cover_epoch_once():
    n = 103
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1) * 2
    y = torch.arange(n)
    g = torch.Generator().manual_seed(1)
    seen = []
    sizes = []
    for xb, yb in batches(x, y, 10, generator=g):
        assert torch.equal(xb[:, 0], yb.float() * 2)  # x and y stay paired
        seen.extend(yb.tolist())
        sizes.append(len(yb))
    assert sorted(seen) == list(range(n))
    assert sizes == [10] * 10 + [3]
    assert seen != list(range(n))  # actually shuffled
    # drop_last drops only the final partial batch
    dl = [len(yb) for _, yb in batches(x, y, 10, generator=g, drop_last=True)]
    assert dl == [10] * 10
    # no shuffle: natural order
    ordered = torch.cat([yb for _, yb in batches(x, y, 7, shuffle=False)])
    assert ordered.tolist() == list(range(n))


def test_batches_same_seed_same_order():
    x = torch.randn(50, 3)
    y = torch.arange(50)
    a = [yb for _, yb in batches(x, y, 8, generator=torch.Generator().manual_seed(5))]
    b = [yb for _, yb in batches(x, y, 8, generator=torch.Generator().manual_seed(5))]
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("n,world", [(96, 4), (100, 3)])
def test_batches_sharding(n, world):
    x = torch.zeros(n, 2)
    y = torch.arange(n)
    shards = []
    nbatches = []
    for rank in range(world):
        g = torch.Generator().manual_seed(123)
        ys = [yb for _, yb in batches(x, y, 5, generator=g, rank=rank, world_size=world)]
        nbatches.append(len(ys))
        assert all(len(v) <= 5 for v in ys)
        shards.append(set(torch.cat(ys).tolist()))
    for i in range(world):
        for j in range(i + 1, world):
            assert not (shards[i] & shards[j])
    union = set().union(*shards)
    assert len(union) == (n // world) * world
    if n % world == 0:
        assert union == set(range(n))
    assert len(set(nbatches)) == 1  # equal number of steps on all ranks


def test_batches_sharding_needs_generator():
    with pytest.raises(ValueError, match="generator"):
        next(batches(torch.zeros(4, 1), torch.zeros(4), 2, rank=0, world_size=2))
    with pytest.raises(ValueError, match="rank"):
        next(batches(torch.zeros(4, 1), torch.zeros(4), 2, shuffle=False, rank=2, world_size=2))


# ---------------------------------------------------------- augmentation


def test_augment_cifar_crop_and_flip():
    torch.manual_seed(0)
    xb = torch.randn(64, 3, 32, 32) + 5.0  # no zeros in the original
    g = torch.Generator().manual_seed(0)
    out = augment_cifar(xb, generator=g)
    assert out.shape == xb.shape
    assert not torch.equal(out, xb)
    assert torch.equal(xb, xb)  # input untouched
    padded = torch.nn.functional.pad(xb, (4, 4, 4, 4))
    n_flipped = 0
    for i in range(64):
        found = False
        for oy in range(9):
            for ox in range(9):
                crop = padded[i, :, oy:oy + 32, ox:ox + 32]
                if torch.equal(out[i], crop):
                    found = True
                elif torch.equal(out[i], crop.flip(-1)):
                    found = True
                    n_flipped += 1
                if found:
                    break
            if found:
                break
        assert found, f"sample {i} is not a (flipped) crop of the padded input"
    assert 10 < n_flipped < 54


def test_restricted_unpickler_numpy1_names(tmp_path):
    # Real CIFAR-10 batches were written with numpy 1.x, which names
    # numpy.core.multiarray._reconstruct; numpy 2 writes numpy._core.
    arr = np.arange(3072 * 2, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    s = pickle.dumps({b"data": arr, b"labels": [3, 4]}, protocol=2)
    if b"numpy._core.multiarray" in s:
        s = s.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in s
    p = tmp_path / "old.pkl"
    p.write_bytes(s)
    obj = D.restricted_load(p)
    assert np.array_equal(obj[b"data"], arr) and obj[b"labels"] == [3, 4]
