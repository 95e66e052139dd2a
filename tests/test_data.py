"""bnlab.data: IDX parsing, verification, source order and the Dataset API, on real MNIST."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnlab import data
from bnlab.data import FILES, DataError

# The vendored canonical files (byte-identical to /work/shared/data/mnist).
MNIST_DIR = Path(__file__).resolve().parents[1] / "src" / "bnlab" / "_data" / "mnist"
SUMS = dict(reversed(line.split()) for line in (MNIST_DIR / "SHA256SUMS").read_text().splitlines())


@pytest.fixture
def env(isolated_data_env):
    """No user settings leak in; the cache is tmp_path/"xdg" (see conftest.py)."""
    return isolated_data_env


def no_vendored(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "VENDORED_ROOT", tmp_path / "no-vendored")


def linked_dir(path: Path) -> Path:
    """A directory of symlinks to the real files (cheap; hashes are cached by real path)."""
    path.mkdir(parents=True)
    for fname in FILES.values():
        (path / fname).symlink_to(MNIST_DIR / fname)
    return path


def copied_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    for fname in FILES.values():
        shutil.copyfile(MNIST_DIR / fname, path / fname)
    return path


def labels_bytes() -> bytes:
    """The raw (decompressed) IDX bytes of the real test labels."""
    return gzip.decompress((MNIST_DIR / FILES["test_labels"]).read_bytes())


def write(path: Path, payload: bytes) -> Path:
    path.write_bytes(payload)
    return path


def one_paragraph(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and len(msg) > 40
    return msg


# ---------------------------------------------------------------- real-file parsing


def test_vendored_files_match_known_sums():
    assert SUMS == data.SHA256["mnist"]
    for fname, digest in SUMS.items():
        assert data.sha256_file(MNIST_DIR / fname) == digest


def test_read_idx_real_files():
    train_x = data.read_idx(MNIST_DIR / FILES["train_images"])
    train_y = data.read_idx(MNIST_DIR / FILES["train_labels"])
    test_x = data.read_idx(MNIST_DIR / FILES["test_images"])
    test_y = data.read_idx(MNIST_DIR / FILES["test_labels"])
    assert train_x.shape == (60000, 28, 28) and train_x.dtype == np.uint8
    assert train_y.shape == (60000,) and train_y.dtype == np.uint8
    assert test_x.shape == (10000, 28, 28) and test_y.shape == (10000,)
    assert train_y[0] == 5 and test_y[0] == 7
    assert train_y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert np.bincount(test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert train_x.min() == 0 and train_x.max() == 255
    assert not train_x.flags.writeable


def test_read_idx_raw_file_equals_gzip(tmp_path):
    raw = write(tmp_path / "labels.idx", labels_bytes())
    # A raw file that keeps a .gz name is still detected by content.
    misnamed = write(tmp_path / "labels.gz", labels_bytes())
    gz = data.read_idx(MNIST_DIR / FILES["test_labels"])
    np.testing.assert_array_equal(data.read_idx(raw), gz)
    np.testing.assert_array_equal(data.read_idx(misnamed), gz)


# ------------------------------------------------------------------- corruption


def test_wrong_magic(tmp_path):
    path = write(tmp_path / "bad", b"\x12\x34" + labels_bytes()[2:])
    with pytest.raises(DataError) as exc:
        data.read_idx(path)
    msg = one_paragraph(exc)
    assert str(path) in msg and "0x12340801" in msg and "magic" in msg


def test_unsupported_dtype(tmp_path):
    raw = labels_bytes()
    path = write(tmp_path / "bad", raw[:2] + b"\x07" + raw[3:])
    with pytest.raises(DataError, match="type code 0x07"):
        data.read_idx(path)


def test_truncated_gzip(tmp_path):
    gz = (MNIST_DIR / FILES["test_labels"]).read_bytes()
    path = write(tmp_path / FILES["test_labels"], gz[: len(gz) // 2])
    with pytest.raises(DataError) as exc:
        data.read_idx(path)
    assert "corrupt or truncated gzip" in one_paragraph(exc) and str(path) in str(exc.value)


def test_corrupt_gzip_stream(tmp_path):
    gz = bytearray((MNIST_DIR / FILES["test_labels"]).read_bytes())
    gz[len(gz) // 2] ^= 0xFF  # damages the deflate data or trips the CRC check
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        data.read_idx(write(tmp_path / "x.gz", bytes(gz)))


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_payload(tmp_path, compress):
    payload = labels_bytes()[:-10]
    path = write(tmp_path / "x", gzip.compress(payload) if compress else payload)
    with pytest.raises(DataError) as exc:
        data.read_idx(path)
    msg = one_paragraph(exc)
    assert "truncated" in msg and "10000 payload bytes" in msg and "9990 bytes" in msg


def test_truncated_header(tmp_path):
    with pytest.raises(DataError, match="truncated inside its header"):
        data.read_idx(write(tmp_path / "x", labels_bytes()[:6]))  # 0x0801 needs 8 bytes
    with pytest.raises(DataError, match="fewer than the 4-byte magic"):
        data.read_idx(write(tmp_path / "y", b"\x00\x00"))


@pytest.mark.parametrize("compress", [False, True])
def test_trailing_bytes(tmp_path, compress):
    payload = labels_bytes() + b"\x00\x01"
    path = write(tmp_path / "x", gzip.compress(payload) if compress else payload)
    with pytest.raises(DataError, match="trailing bytes"):
        data.read_idx(path)


def test_garbage_after_gzip_stream(tmp_path):
    gz = (MNIST_DIR / FILES["test_labels"]).read_bytes()
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        data.read_idx(write(tmp_path / "x.gz", gz + b"garbage!"))


def test_count_mismatch_between_images_and_labels():
    arrays = {k: data.read_idx(MNIST_DIR / f) for k, f in FILES.items()}
    arrays["test_labels"] = arrays["test_labels"][:-1]
    with pytest.raises(DataError) as exc:
        data._check_arrays("mnist", MNIST_DIR, arrays)
    msg = one_paragraph(exc)
    assert "10000 images" in msg and "9999 labels" in msg and FILES["test_labels"] in msg


def test_labels_in_place_of_images_rejected():
    arrays = {k: data.read_idx(MNIST_DIR / f) for k, f in FILES.items()}
    arrays["test_images"] = arrays["test_labels"]
    with pytest.raises(DataError, match=r"shape \(n, 28, 28\)"):
        data._check_arrays("mnist", MNIST_DIR, arrays)


def test_flipped_byte_is_sha256_mismatch(env, tmp_path):
    d = copied_dir(tmp_path / "copy")
    target = d / FILES["test_labels"]
    blob = bytearray(target.read_bytes())
    blob[100] ^= 0x01
    target.write_bytes(bytes(blob))
    with pytest.raises(DataError) as exc:
        data.load_dataset("mnist", d)
    msg = one_paragraph(exc)
    assert str(target) in msg
    assert SUMS[FILES["test_labels"]] in msg  # expected
    assert data.sha256_file(target) in msg  # found
    assert "--data-dir" in msg


def test_sha256_cache_follows_file_changes(tmp_path):
    path = write(tmp_path / "f", b"abc")
    first = data.sha256_file(path)
    assert first == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    path.write_bytes(b"abcd")
    os.utime(path, ns=(1, 1))  # a distinct mtime even on coarse-clock filesystems
    assert data.sha256_file(path) == "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589"


# ------------------------------------------------------ hypothesis: IDX round trip

CODES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def write_idx(arr: np.ndarray, code: int) -> bytes:
    """A minimal IDX writer, independent of the reader under test."""
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(CODES[code]).tobytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    code=st.sampled_from(sorted(CODES)),
    dims=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    seed=st.integers(0, 2**32 - 1),
    compress=st.booleans(),
)
def test_idx_round_trip(tmp_path, code, dims, seed, compress):
    rng = np.random.default_rng(seed)
    dtype = np.dtype(CODES[code]).newbyteorder("=")
    if dtype.kind == "f":
        arr = rng.standard_normal(dims).astype(dtype)
    else:
        info = np.iinfo(dtype)
        arr = rng.integers(info.min, info.max, size=dims, endpoint=True, dtype=dtype)
    blob = write_idx(arr, code)
    path = write(tmp_path / "x", gzip.compress(blob) if compress else blob)
    out = data.read_idx(path)
    assert out.dtype == dtype and out.dtype.isnative and not out.flags.writeable
    assert out.shape == tuple(dims)
    np.testing.assert_array_equal(out, arr)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(code=st.integers(0, 255).filter(lambda c: c not in CODES), ndim=st.integers(1, 3))
def test_idx_unknown_type_codes_rejected(tmp_path, code, ndim):
    blob = struct.pack(">BBBB", 0, 0, code, ndim) + struct.pack(f">{ndim}I", *([1] * ndim)) + b"\x00" * 8
    with pytest.raises(DataError, match=f"type code 0x{code:02x}"):
        data.read_idx(write(tmp_path / "x", blob))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dims=st.lists(st.integers(1, 4), min_size=1, max_size=3), cut=st.integers(1, 8))
def test_idx_payload_length_must_match_header(tmp_path, dims, cut):
    blob = write_idx(np.zeros(dims, np.int32), 0x0C)
    with pytest.raises(DataError, match="truncated"):
        data.read_idx(write(tmp_path / "short", blob[:-cut]))
    with pytest.raises(DataError, match="trailing bytes"):
        data.read_idx(write(tmp_path / "long", blob + b"\x00" * cut))


# ------------------------------------------------------------------ source order


def test_explicit_dir_beats_env_vendored_and_cache(env, tmp_path, monkeypatch):
    explicit = linked_dir(tmp_path / "explicit")
    monkeypatch.setenv("BNLAB_DATA_DIR", str(linked_dir(tmp_path / "env")))
    linked_dir(data.default_cache_dir("mnist"))
    assert data.find_data_dir("mnist", explicit) == explicit
    assert data.find_data_dir("mnist", str(explicit), download=False) == explicit


def test_env_beats_vendored_and_cache(env, tmp_path, monkeypatch):
    env_dir = linked_dir(tmp_path / "env")
    monkeypatch.setenv("BNLAB_DATA_DIR", str(env_dir))
    linked_dir(data.default_cache_dir("mnist"))
    assert data.find_data_dir("mnist", download=False) == env_dir


def test_vendored_beats_cache(env):
    linked_dir(data.default_cache_dir("mnist"))
    assert data.find_data_dir("mnist", download=False) == MNIST_DIR
    assert data.VENDORED_ROOT / "mnist" == MNIST_DIR


def test_system_dir_beats_cache(env, tmp_path, monkeypatch):
    no_vendored(monkeypatch, tmp_path)
    linked_dir(data.default_cache_dir("mnist"))
    system = linked_dir(tmp_path / "system" / "mnist")
    monkeypatch.setattr(data, "SYSTEM_ROOT", tmp_path / "system")
    assert data.find_data_dir("mnist", download=False) == system


def test_vendored_beats_system(env, tmp_path, monkeypatch):
    vendored = linked_dir(tmp_path / "vendored" / "mnist")
    linked_dir(tmp_path / "system" / "mnist")
    monkeypatch.setattr(data, "VENDORED_ROOT", tmp_path / "vendored")
    monkeypatch.setattr(data, "SYSTEM_ROOT", tmp_path / "system")
    assert data.find_data_dir("mnist", download=False) == vendored


def test_cache_used_when_nothing_else(env, tmp_path, monkeypatch):
    no_vendored(monkeypatch, tmp_path)
    cache = linked_dir(tmp_path / "xdg" / "bnlab" / "mnist")
    assert data.find_data_dir("mnist", download=False) == cache


def test_home_cache_when_xdg_unset(env, tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.default_cache_dir("fashion-mnist") == tmp_path / "home" / ".cache" / "bnlab" / "fashion-mnist"


def test_parent_dir_with_name_subdir(env, tmp_path, monkeypatch):
    sub = linked_dir(tmp_path / "root" / "mnist")
    assert data.find_data_dir("mnist", tmp_path / "root") == sub
    monkeypatch.setenv("BNLAB_DATA_DIR", str(tmp_path / "root"))
    assert data.find_data_dir("mnist") == sub


def test_explicit_dir_missing_a_file_is_an_error(env, tmp_path, monkeypatch):
    explicit = linked_dir(tmp_path / "explicit")
    (explicit / FILES["test_labels"]).unlink()
    # Good copies elsewhere must not be used instead.
    monkeypatch.setenv("BNLAB_DATA_DIR", str(linked_dir(tmp_path / "env")))
    with pytest.raises(DataError) as exc:
        data.find_data_dir("mnist", explicit)
    msg = one_paragraph(exc)
    assert str(explicit) in msg and FILES["test_labels"] in msg and "--data-dir" in msg
    assert f"lacks {FILES['test_labels']} (" in msg  # only the missing file is named


def test_explicit_dir_that_does_not_exist(env, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.find_data_dir("mnist", tmp_path / "nowhere")


def test_env_dir_missing_files_is_an_error(env, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("BNLAB_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="BNLAB_DATA_DIR"):
        data.find_data_dir("mnist")


def test_nothing_found_without_download(env, tmp_path, monkeypatch):
    no_vendored(monkeypatch, tmp_path)
    with pytest.raises(DataError) as exc:
        data.find_data_dir("mnist", download=False)
    msg = one_paragraph(exc)
    assert str(data.default_cache_dir("mnist")) in msg and "download" in msg


def test_partial_vendored_copy_is_skipped(env, tmp_path, monkeypatch):
    partial = linked_dir(tmp_path / "vendored" / "mnist")
    (partial / FILES["train_images"]).unlink()
    monkeypatch.setattr(data, "VENDORED_ROOT", tmp_path / "vendored")
    cache = linked_dir(data.default_cache_dir("mnist"))
    assert data.find_data_dir("mnist", download=False) == cache


def test_fashion_mnist_sums_are_checked_separately(env, tmp_path):
    # MNIST files in a Fashion-MNIST directory are rejected by checksum.
    d = linked_dir(tmp_path / "fashion")
    with pytest.raises(DataError) as exc:
        data.load_dataset("fashion-mnist", d)
    msg = one_paragraph(exc)
    assert "Fashion-MNIST" in msg and data.SHA256["fashion-mnist"][FILES["train_images"]] in msg


def test_fashion_mnist_search_names_system_dir(env, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_ROOT", Path("/usr/share/datasets"))
    no_vendored(monkeypatch, tmp_path)
    if Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("a system Fashion-MNIST is installed")
    with pytest.raises(DataError, match="/usr/share/datasets/fashion-mnist"):
        data.find_data_dir("fashion-mnist", download=False)


def test_unknown_dataset_name(env):
    with pytest.raises(ValueError, match="fashion-mnist"):
        data.find_data_dir("cifar10")


# --------------------------------------------------------------- Dataset / loading


def test_load_mnist_vendored(env):
    ds = data.load_mnist(download=False)
    assert ds.name == "mnist" and ds.source == str(MNIST_DIR)
    assert ds.train_images.shape == (60000, 28, 28) and ds.train_images.dtype == np.uint8
    assert ds.train_labels.shape == (60000,) and ds.test_images.shape == (10000, 28, 28)
    assert ds.test_labels.shape == (10000,)
    assert ds.train_labels[0] == 5 and ds.test_labels[0] == 7
    assert ds.sha256 == SUMS
    for arr in (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels):
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr[0] = 1
    assert "60000" in repr(ds) and len(repr(ds)) < 200


def test_load_is_cached_and_isolated(env, tmp_path):
    first = data.load_dataset("mnist")
    second = data.load_dataset("mnist")
    assert second.train_images is first.train_images
    first.sha256.clear()  # a caller's mutation must not reach the next caller
    assert data.load_dataset("mnist").sha256 == SUMS
    # Same real directory reached through another path: same parsed arrays.
    link = tmp_path / "link"
    link.symlink_to(MNIST_DIR)
    via_link = data.load_dataset("mnist", link)
    assert via_link.train_images is first.train_images and via_link.source == str(link)


def test_cached_load_still_rechecks_files(env, tmp_path):
    d = copied_dir(tmp_path / "copy")
    first = data.load_dataset("mnist", d)  # now cached
    target = d / FILES["test_labels"]
    blob = bytearray(target.read_bytes())
    blob[-1] ^= 0xFF
    target.write_bytes(bytes(blob))
    os.utime(target, ns=(1, 1))
    with pytest.raises(DataError, match=str(target)):
        data.load_dataset("mnist", d)
    shutil.copyfile(MNIST_DIR / FILES["test_labels"], target)
    again = data.load_dataset("mnist", d)
    assert again.train_images is first.train_images and again.test_labels[0] == 7


def test_to_float_matches_seed():
    x = data.read_idx(MNIST_DIR / FILES["test_images"])
    out = data.to_float(x)
    seed = x.reshape(len(x), 784).astype("float32") / 255
    assert out.dtype == np.float32 and out.shape == (10000, 784)
    assert np.array_equal(out, seed)
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_array_equal(data.to_float(x.reshape(-1, 784)), out)
    assert out.flags.writeable  # a fresh array the caller owns


@pytest.mark.parametrize(
    "bad", [np.zeros((2, 28, 28), np.float32), np.zeros((2, 27, 28), np.uint8), np.zeros((2, 783), np.uint8)]
)
def test_to_float_rejects_other_inputs(bad):
    with pytest.raises(ValueError):
        data.to_float(bad)
