"""Real MNIST and Fashion-MNIST, located, downloaded if needed, and verified by sha256.

Where the four gzip IDX files of a dataset are looked for, first match wins:

1. ``data_dir=`` (CLI ``--data-dir``): must hold the files; never falls through.
2. ``$BNLAB_DATA_DIR``: same rule as ``data_dir=``.
3. The copy vendored in the package (``bnlab/_data/<name>/``: MNIST ships in the source
   tree and in the wheel; Fashion-MNIST does not), skipped when the directory does not exist.
4. The system copy (``/usr/share/datasets/<name>/``, where Debian's
   ``dataset-fashion-mnist`` package puts Fashion-MNIST).
5. The user cache (``$XDG_CACHE_HOME/bnlab/<name>/`` or ``~/.cache/bnlab/<name>/``),
   filled on demand from the public mirrors torchvision and TensorFlow use.

``data_dir=`` and ``$BNLAB_DATA_DIR`` may name either the directory holding the four
files or a parent holding a ``<name>/`` sub-directory, so one setting serves both
datasets.

Every file is checked against its known sha256 before it is parsed, and every failure
(missing, corrupt, truncated, inconsistent, undownloadable) raises :class:`DataError`
with a one-paragraph message saying which file, what was expected, what was found and
what to do.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import logging
import math
import os
import sys
import tempfile
import threading
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnlab import __version__
from bnlab.errors import InputError

__all__ = [
    "DATASETS",
    "FILES",
    "SHA256",
    "MIRRORS",
    "DataError",
    "Dataset",
    "read_idx",
    "sha256_file",
    "default_cache_dir",
    "find_data_dir",
    "load_dataset",
    "load_mnist",
    "to_float",
]

log = logging.getLogger(__name__)

DATASETS = ("mnist", "fashion-mnist")

# Both datasets use the same four file names, so a directory is tied to a dataset
# only by the sha256 sums below.
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# sha256 of the canonical gzip files. MNIST: the files vendored in src/bnlab/_data/mnist/
# (see its SHA256SUMS). Fashion-MNIST: the files Zalando Research publishes
# (github.com/zalandoresearch/fashion-mnist, data/fashion/), as listed identically by
# two independent public projects that also list the MNIST sums above correctly.
SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
        "train-labels-idx1-ubyte.gz": "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
        "t10k-images-idx3-ubyte.gz": "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
        "t10k-labels-idx1-ubyte.gz": "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",
    },
}

# The mirrors torchvision and TensorFlow download from (yann.lecun.com no longer
# serves the files reliably, so it is not listed).
MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
    ),
}

ENV_DATA_DIR = "BNLAB_DATA_DIR"
# One variable per dataset: a mirror of one dataset never serves the other.
ENV_MIRRORS = {"mnist": "BNLAB_MNIST_MIRRORS", "fashion-mnist": "BNLAB_FASHION_MNIST_MIRRORS"}

# Module attributes rather than literals inside functions so tests can point them
# at temporary directories.
# Inside the package, so that the same path serves a source checkout (src/bnlab/_data) and
# an installed wheel (site-packages/bnlab/_data: pyproject.toml's package-data).
VENDORED_ROOT = Path(__file__).resolve().parent / "_data"
SYSTEM_ROOT = Path("/usr/share/datasets")

_LABEL = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
_IMAGE_SHAPE = (28, 28)
_N_CLASSES = 10
# The largest canonical file is 26 MB; anything far bigger is not one of them, and
# stopping early keeps a misbehaving server from filling the disk.
_MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
_CHUNK = 1 << 20

# IDX type codes (third byte of the magic number); payloads are big-endian.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


class DataError(InputError):
    """A dataset file is missing, corrupt, inconsistent or could not be downloaded (exit 2)."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing arrays with == is ambiguous
class Dataset:
    """One dataset's four arrays (read-only uint8) and where they came from."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str
    sha256: dict[str, str]

    def __repr__(self) -> str:
        # The default repr would print four large arrays.
        return (
            f"Dataset(name={self.name!r}, train={len(self.train_labels)}, "
            f"test={len(self.test_labels)}, source={self.source!r})"
        )


# --------------------------------------------------------------------------- hashing

_lock = threading.Lock()
_hash_cache: dict[tuple[str, int, int], str] = {}


def _stat_key(path: Path) -> tuple[str, int, int]:
    resolved = path.resolve()
    st = resolved.stat()
    return (str(resolved), st.st_size, st.st_mtime_ns)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, hashed once per (path, size, mtime) per process."""
    p = Path(path)
    key = _stat_key(p)
    with _lock:
        cached = _hash_cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(p, "rb") as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    hexdigest = digest.hexdigest()
    with _lock:
        _hash_cache[key] = hexdigest
    return hexdigest


def _remember_hash(path: Path, hexdigest: str) -> None:
    """Record a digest computed while downloading, so the file is not read again."""
    with _lock:
        _hash_cache[_stat_key(path)] = hexdigest


# ------------------------------------------------------------------------------ IDX


def _parse_idx_header(buf: bytes, where: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """(big-endian dtype, dims, payload offset) of an IDX buffer; DataError if malformed."""
    if len(buf) < 4:
        raise DataError(
            f"{where} is not an IDX file: it holds {len(buf)} bytes, fewer than the "
            f"4-byte magic number. The file is truncated; replace it with the canonical file."
        )
    zero, code, ndim = buf[0] << 8 | buf[1], buf[2], buf[3]
    magic = int.from_bytes(buf[:4], "big")
    if zero != 0 or ndim == 0:
        raise DataError(
            f"{where} has magic number 0x{magic:08x}, which is not an IDX magic number "
            f"(expected 0x0000TTNN with a type code TT and 1 or more dimensions NN, e.g. "
            f"0x00000801 for labels or 0x00000803 for images). The file is not an IDX "
            f"file or is damaged; replace it with the canonical file."
        )
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        raise DataError(
            f"{where} has magic number 0x{magic:08x} whose type code 0x{code:02x} is not "
            f"an IDX data type (expected one of {known}). The file is damaged or not an "
            f"IDX file; replace it with the canonical file."
        )
    offset = 4 + 4 * ndim
    if len(buf) < offset:
        raise DataError(
            f"{where} is truncated inside its header: magic 0x{magic:08x} announces "
            f"{ndim} dimensions ({offset} header bytes) but the file holds only "
            f"{len(buf)} bytes. Replace it with the canonical file."
        )
    dims = tuple(int.from_bytes(buf[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return _IDX_DTYPES[code], dims, offset


def _decompress(raw: bytes, where: str) -> bytes:
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        # BadGzipFile (an OSError) covers bad headers, CRC errors and trailing
        # non-gzip bytes; EOFError a stream cut short; zlib.error a damaged stream.
        raise DataError(
            f"{where} is a corrupt or truncated gzip stream ({type(exc).__name__}: {exc}); "
            f"expected a complete gzip-compressed IDX file of {len(raw)} bytes or more. "
            f"Replace it with the canonical file (delete it and rerun if it is in the "
            f"bnlab cache)."
        ) from exc


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gzip-compressed or raw, into a read-only native-endian array.

    The dtype comes from the magic number's type code (0x08 is uint8, as in every
    MNIST file). Raises :class:`DataError` on a bad magic number, an unknown type
    code, a payload shorter or longer than the header's dimensions imply, or a
    corrupt gzip stream.
    """
    p = Path(path)
    where = str(p)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read IDX file {where}: {exc}.") from exc
    # Detect compression from the content, not the name: a decompressed file may
    # keep its .gz name and vice versa.
    buf = _decompress(raw, where) if raw[:2] == _GZIP_MAGIC else raw
    dtype, dims, offset = _parse_idx_header(buf, where)
    count = math.prod(dims)
    expected = count * dtype.itemsize
    found = len(buf) - offset
    if found != expected:
        shape = " x ".join(map(str, dims))
        problem = "truncated" if found < expected else "followed by trailing bytes"
        raise DataError(
            f"{where} is {problem}: its header announces {shape} items of {dtype.itemsize} "
            f"byte(s), i.e. {expected} payload bytes, but {found} bytes follow the header. "
            f"Replace it with the canonical file (delete it and rerun if it is in the "
            f"bnlab cache)."
        )
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(dims)
    if dtype.itemsize > 1:
        arr = arr.astype(dtype.newbyteorder("="))
    arr.flags.writeable = False
    return arr


# ------------------------------------------------------------------------- locating


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")


def default_cache_dir(name: str = "mnist") -> Path:
    """``$XDG_CACHE_HOME/bnlab/<name>``, or ``~/.cache/bnlab/<name>`` when unset."""
    _check_name(name)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "bnlab" / name


def _missing(directory: Path) -> list[str]:
    return [f for f in FILES.values() if not (directory / f).is_file()]


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _fix_hint(path: Path, name: str) -> str:
    label = _LABEL[name]
    where = "pass --data-dir (or set BNLAB_DATA_DIR) pointing at the four canonical"
    if _is_within(path, default_cache_dir(name)):
        return f"Delete it and rerun to download it again, or {where} {label} files."
    return f"Replace it with the canonical file, or {where} {label} files."


def _verify(name: str, directory: Path) -> dict[str, str]:
    """sha256 of each of the four files, checked against the known sums."""
    sums = {}
    for fname in FILES.values():
        path = directory / fname
        expected = SHA256[name][fname]
        try:
            found = sha256_file(path)
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc}. {_fix_hint(path, name)}") from exc
        if found != expected:
            raise DataError(
                f"{path} is not the canonical {_LABEL[name]} file {fname}: expected sha256 "
                f"{expected}, found {found} ({path.stat().st_size} bytes). It is corrupt, "
                f"truncated or a different file. {_fix_hint(path, name)}"
            )
        sums[fname] = found
    return sums


def _user_dir(name: str, directory: Path, origin: str) -> Path:
    """The directory a user named, or its ``<name>/`` sub-directory; never falls through."""
    directory = directory.expanduser()
    if not _missing(directory):
        return directory
    sub = directory / name
    if sub.is_dir() and not _missing(sub):
        return sub
    label = _LABEL[name]
    if not directory.is_dir():
        found = "that directory does not exist"
    else:
        found = f"it lacks {', '.join(_missing(directory))} (nor does {sub} hold all four)"
    raise DataError(
        f"{origin} is {directory}, but {found}. Expected the four canonical {label} files "
        f"{', '.join(FILES.values())} in that directory or in its {name}/ sub-directory. "
        f"Copy them there, point {origin} at the directory that holds them, or leave it "
        f"unset to let bnlab use its cache and download them."
    )


def _resolve_mirrors(name: str, mirrors: str | Iterable[str] | None) -> list[str]:
    if mirrors is None:
        mirrors = os.environ.get(ENV_MIRRORS[name]) or MIRRORS[name]
    if isinstance(mirrors, str):
        mirrors = mirrors.split(",")
    return [m.strip() for m in mirrors if m.strip()]


def find_data_dir(
    name: str = "mnist",
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    mirrors: str | Sequence[str] | None = None,
    timeout: float = 30.0,
) -> Path:
    """Directory holding the four verified files of ``name``, downloading them if needed.

    See the module docstring for the search order. ``mirrors`` (a list of base URLs, or
    one comma-separated string) overrides ``$BNLAB_MNIST_MIRRORS`` /
    ``$BNLAB_FASHION_MNIST_MIRRORS``, which override the public mirrors. ``timeout``
    is the per-request network timeout in seconds.
    """
    _check_name(name)
    if data_dir is not None:
        directory = _user_dir(name, Path(data_dir), "data_dir (--data-dir)")
    elif os.environ.get(ENV_DATA_DIR):
        directory = _user_dir(name, Path(os.environ[ENV_DATA_DIR]), ENV_DATA_DIR)
    else:
        directory = _find_or_fetch(name, download, mirrors, timeout)
    _verify(name, directory)
    return directory


def _find_or_fetch(name: str, download: bool, mirrors: str | Sequence[str] | None, timeout: float) -> Path:
    """Vendored copy, then system copy, then the cache (downloading what it lacks)."""
    for candidate in (VENDORED_ROOT / name, SYSTEM_ROOT / name):
        # A partial copy here is skipped, not an error: the user did not ask for it.
        if candidate.is_dir() and not _missing(candidate):
            return candidate
    cache = default_cache_dir(name)
    missing = _missing(cache)
    if not missing:
        return cache
    label = _LABEL[name]
    if not download:
        raise DataError(
            f"the {label} files were not found: expected {', '.join(FILES.values())} in "
            f"one of {VENDORED_ROOT / name}, {SYSTEM_ROOT / name} or the cache {cache} "
            f"(which lacks {', '.join(missing)}), and downloading is disabled. Pass "
            f"--data-dir (or set {ENV_DATA_DIR}) pointing at the four canonical files, "
            f"or allow bnlab to download them."
        )
    urls = _resolve_mirrors(name, mirrors)
    if not urls:
        raise DataError(
            f"the {label} files are missing from the cache {cache} ({', '.join(missing)}) "
            f"and no download mirror is configured (mirrors= or {ENV_MIRRORS[name]} is "
            f"empty). Set {ENV_MIRRORS[name]} to a mirror's base URL, or pass --data-dir "
            f"pointing at the four canonical files."
        )
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cache_unwritable(name, cache, exc) from exc
    # Said before the first byte: a download is a surprise worth a line (and, offline, the
    # reason for the wait before the error).
    _say(
        f"bnlab: {label} is not in {VENDORED_ROOT / name} or {SYSTEM_ROOT / name}; downloading "
        f"{', '.join(missing)} into {cache} (verified by sha256)"
    )
    for fname in missing:
        _download(name, fname, cache, urls, timeout)
    return cache


def _say(text: str) -> None:
    """A line on stderr (stdout may hold a JSON result)."""
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ download


def _cache_unwritable(name: str, cache: Path, exc: OSError) -> DataError:
    return DataError(
        f"cannot write the {_LABEL[name]} download cache {cache} ({exc}); expected a "
        f"writable directory. Set XDG_CACHE_HOME to a writable location, or pass "
        f"--data-dir pointing at the four canonical files."
    )


class _FetchFailed(Exception):
    """One mirror failed for one file; collected so the final error lists them all."""


def _download(name: str, fname: str, cache: Path, urls: list[str], timeout: float) -> None:
    """Fetch ``fname`` into ``cache``, trying each mirror in turn."""
    errors = []
    for base in urls:
        url = base if base.endswith("/") else base + "/"
        url += fname
        log.info("downloading %s", url)
        try:
            _fetch(name, url, cache / fname, timeout)
            return
        except _FetchFailed as exc:
            log.warning("download of %s failed: %s", url, exc)
            errors.append(f"{url}: {exc}")
    raise DataError(
        f"could not download the {_LABEL[name]} file {fname} (expected sha256 "
        f"{SHA256[name][fname]}) from any mirror: {'; '.join(errors)}. No partial or "
        f"unverified file was left in {cache}. Check the network or proxy, set "
        f"{ENV_MIRRORS[name]} to a working mirror (comma-separated base URLs), or download "
        f"the four files yourself and pass --data-dir pointing at them."
    )


def _fetch(name: str, url: str, dest: Path, timeout: float) -> None:
    """Stream ``url`` into a temp file beside ``dest``, check its sha256, then rename.

    The temp file lives in the destination directory so ``os.replace`` is atomic: a
    reader sees either no file or the whole verified one, never a partial download.
    """
    if not url.startswith(("http://", "https://")):
        raise _FetchFailed("unsupported URL scheme (only http:// and https:// are used)")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as exc:  # the cache's fault, not the mirror's: no point trying others
        raise _cache_unwritable(name, dest.parent, exc) from exc
    tmp: Path | None = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest, size = _stream(url, out, timeout)
            out.flush()
            os.fsync(out.fileno())
        expected = SHA256[name][dest.name]
        if digest != expected:
            raise _FetchFailed(f"sha256 mismatch: got {digest} for {size} bytes, expected {expected}")
        assert tmp is not None
        os.replace(tmp, dest)
        tmp = None
        _remember_hash(dest, digest)
    except urllib.error.HTTPError as exc:
        raise _FetchFailed(f"HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise _FetchFailed(f"{exc.reason}") from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise _FetchFailed(f"{type(exc).__name__}: {exc}") from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _stream(url: str, out, timeout: float) -> tuple[str, int]:
    """Copy the response body to ``out`` with a progress bar on stderr; (sha256 hex, byte count)."""
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": f"bnlab/{__version__}"})
    digest = hashlib.sha256()
    size = 0
    interactive = sys.stderr.isatty()
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        announced = resp.headers.get("Content-Length")
        total = int(announced) if announced is not None and announced.isdigit() else None
        # Into a log file (not a terminal) the bar writes a line at most every 30 s.
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=url.rsplit("/", 1)[-1],
            file=sys.stderr,
            leave=True,
            mininterval=0.2 if interactive else 30.0,
        ) as bar:
            while chunk := resp.read(_CHUNK):
                size += len(chunk)
                if size > _MAX_DOWNLOAD_BYTES:
                    raise _FetchFailed(f"response exceeds {_MAX_DOWNLOAD_BYTES} bytes; not a dataset file")
                digest.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
    # http.client reports a connection closed early as a clean end of body when reading
    # in chunks, so compare with the announced length to name the failure precisely.
    if announced is not None and announced.isdigit() and size != int(announced):
        raise _FetchFailed(f"truncated: received {size} of {announced} announced bytes")
    return digest.hexdigest(), size


# -------------------------------------------------------------------------- loading

_dataset_cache: dict[tuple[str, str], Dataset] = {}


def _check_arrays(name: str, source: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Shapes, dtypes, counts and label range that any MNIST-format dataset must have."""
    label = _LABEL[name]
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        ipath, lpath = source / FILES[f"{split}_images"], source / FILES[f"{split}_labels"]
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != _IMAGE_SHAPE:
            raise DataError(
                f"{ipath} holds {images.dtype} data of shape {images.shape}; expected "
                f"uint8 {label} images of shape (n, 28, 28) (magic 0x00000803). "
                f"{_fix_hint(ipath, name)}"
            )
        if labels.dtype != np.uint8 or labels.ndim != 1:
            raise DataError(
                f"{lpath} holds {labels.dtype} data of shape {labels.shape}; expected a "
                f"1-D uint8 {label} label vector (magic 0x00000801). {_fix_hint(lpath, name)}"
            )
        if len(images) != len(labels):
            raise DataError(
                f"{ipath} holds {len(images)} images but {lpath} holds {len(labels)} "
                f"labels; expected equal counts. The two files come from different "
                f"datasets or splits. {_fix_hint(lpath, name)}"
            )
        if len(labels) and int(labels.max()) >= _N_CLASSES:
            raise DataError(
                f"{lpath} holds label {int(labels.max())}; expected labels 0 to "
                f"{_N_CLASSES - 1}. {_fix_hint(lpath, name)}"
            )


def _parse(name: str, directory: Path, sums: dict[str, str]) -> Dataset:
    arrays = {key: read_idx(directory / fname) for key, fname in FILES.items()}
    _check_arrays(name, directory, arrays)
    return Dataset(name=name, source=str(directory.absolute()), sha256=sums, **arrays)


def load_dataset(
    name: str = "mnist",
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    mirrors: str | Sequence[str] | None = None,
    timeout: float = 30.0,
) -> Dataset:
    """Locate (see :func:`find_data_dir`), verify and parse one dataset.

    Parsed datasets are cached per (name, directory) for the life of the process; the
    files are still re-verified on each call (a changed file raises DataError), and the
    arrays are read-only so that no caller can alter what the next caller gets.
    """
    # find_data_dir re-checks every file's sha256 on each call (cheap: hashes are
    # cached by path, size and mtime), and files that pass are byte-identical to the
    # canonical ones, so a cached parse can never be stale.
    directory = find_data_dir(name, data_dir, download=download, mirrors=mirrors, timeout=timeout)
    key = (name, str(directory.resolve()))
    with _lock:
        dataset = _dataset_cache.get(key)
    if dataset is None:
        dataset = _parse(name, directory, _verify(name, directory))
        with _lock:
            _dataset_cache[key] = dataset
    # A fresh dict and the caller's own spelling of the directory; arrays are shared.
    return dataclasses.replace(dataset, sha256=dict(dataset.sha256), source=str(directory.absolute()))


def load_mnist(data_dir: str | os.PathLike | None = None, **kw) -> Dataset:
    """``load_dataset("mnist", data_dir, **kw)``."""
    return load_dataset("mnist", data_dir, **kw)


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 images, (n, 28, 28) or (n, 784), to float32 (n, 784) in [0, 1].

    Same arithmetic as the question's program (``x.reshape(n, 784).astype('float32') / 255``), so
    results are bit-identical to it.
    """
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise ValueError(f"to_float expects uint8 images, got {x.dtype}")
    pixels = _IMAGE_SHAPE[0] * _IMAGE_SHAPE[1]
    if not ((x.ndim == 3 and x.shape[1:] == _IMAGE_SHAPE) or (x.ndim == 2 and x.shape[1] == pixels)):
        raise ValueError(f"to_float expects shape (n, 28, 28) or (n, 784), got {x.shape}")
    n = x.shape[0]
    out = x.reshape(n, pixels).astype(np.float32)
    out /= 255  # in place: the same float32 division as `/ 255`, without a second 188 MB array
    return out
