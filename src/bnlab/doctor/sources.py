"""Where the command line's batches come from, and what each batch is used for.

Three sources, each split so that the doctor never judges a model on a batch it trained on:

- ``--input-shape``: the probe is one standard-normal batch; training steps use FRESH
  standard-normal batches (other seeds) with random labels.
- ``--data mnist`` / ``fashion-mnist``: training steps (and re-estimation for ``--fix``)
  use the training split; the probe and the evaluation use the test split.
- ``--data FILE.py:NAME``: NAME (a function with no arguments, or an iterable such as a
  DataLoader) gives ``(inputs, labels)`` batches; the last sixth of them (at least one)
  is held out for the probe and the evaluation, the rest is for training and re-estimation.
- ``--data FILE.npz[:X,Y]`` / ``FILE.npy``: numpy arrays (an .npy holds inputs only, which
  is enough to probe; training steps and ``--fix`` need labels). Read with
  ``allow_pickle=False`` and memory-mapped; one sixth of the samples, drawn with the
  seed, is held out for the probe and the evaluation. The inputs are taken as they are,
  cast to float32 (uint8 images stay 0-255: the built-in MNIST is scaled to [0, 1]).

Arrays are numpy (float32 inputs, int64 labels); every backend accepts them.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from bnlab.doctor.backend import Backend
from bnlab.doctor.errors import InputError, UsageError, quote_error
from bnlab.doctor.loader import LoadError, import_file

Batch = tuple[np.ndarray, np.ndarray]

BUILTIN = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
# Batches read from a FILE.py:NAME source at most (they are kept in memory).
DEFAULT_MAX_BATCHES = 500
HELD_OUT_SHARE = 6  # one batch in six is held out


@dataclass
class Source:
    """The batches of one doctor run, each set with its use.

    ``fit_batches`` (real data only) is one pass over the training batches, for the
    re-estimation of running statistics by ``--fix``; ``held_out`` the batches the
    repair is evaluated on. ``uses`` says, for the report, which batches did what.
    """

    probe_x: np.ndarray
    probe_y: np.ndarray | None
    train_batches: Iterable[Batch] | None
    description: str  # shown after the probe shape: "(MNIST test images)"
    uses: dict[str, str] = field(default_factory=dict)
    fit_batches: Callable[[], Iterable[Batch]] | None = None
    held_out: list[Batch] | None = None

    @property
    def real(self) -> bool:
        return self.held_out is not None


# -- --input-shape ------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1000,784"`` -> (1000, 784)."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise InputError(f"--input-shape must be integers separated by commas, like 1000,784; got {text!r}") from None
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise InputError(
            f"--input-shape needs a batch size and at least one more positive dimension, like 1000,784; got {text!r}"
        )
    return shape


# Share of the machine's memory one batch (or all batches kept from --data FILE.py:NAME) may
# take: the doctor holds the probe batch, a training batch of the same shape and the model's
# activations on each (often several times the batch) at once.
MEMORY_SHARE = 8
FALLBACK_MEMORY = 16 << 30  # where the system does not say how much memory it has


def memory_limit() -> int:
    """Bytes the doctor's batches may take: 1/MEMORY_SHARE of the physical memory."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = FALLBACK_MEMORY
    return max(total, 1 << 30) // MEMORY_SHARE


def _gib(size: int) -> str:
    return f"{size / 2**30:.3g} GiB"


def check_batch_size(shape: tuple[int, ...]) -> None:
    """InputError before allocating a float32 batch of ``shape`` that cannot fit in memory."""
    size = math.prod(shape) * np.dtype(np.float32).itemsize
    limit = memory_limit()
    if size > limit:
        raise InputError(
            f"a probe batch of shape {','.join(map(str, shape))} (--input-shape, --batch-size) "
            f"would take {_gib(size)} as float32; bnlab doctor allows one batch {_gib(limit)}, "
            f"1/{MEMORY_SHARE} of this machine's memory, because it holds the probe, a training "
            "batch and the model's activations on them at once. Give a smaller batch (the first "
            "dimension: a few hundred samples are enough, e.g. --input-shape 256,...)."
        )


def random_inputs(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A standard-normal probe batch (training steps, if any, repeat it with random labels)."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def class_count(model: Any, backend: Backend, x: np.ndarray) -> int:
    """Number of classes in the model's output (N, C, ...); UsageError if it has none."""
    try:
        out = backend.eval_output(model, x[:2])
    except Exception as err:
        raise InputError(
            f"the model does not run on inputs of shape {tuple(x.shape)} "
            f"({quote_error(err)}); give the shape it expects with --input-shape."
        ) from err
    shape: tuple[int, ...] = np.shape(out) if out is not None else ()
    if len(shape) < 2 or shape[1] < 2:
        raise UsageError(
            "--train-steps with --input-shape trains on random labels, which needs class scores "
            f"of shape (N, C, ...) as the model's output; it returned shape {tuple(shape)}. "
            "Use --train-steps 0, or --data FILE.py:NAME with your own labels."
        )
    return int(shape[1])


def random_source(model: Any, backend: Backend, shape: tuple[int, ...], seed: int, train_steps: int) -> Source:
    """A standard-normal probe; training steps on fresh standard-normal batches.

    Training on the probe batch itself would let the copy memorize it, and a memorized
    batch looks unlike anything else to the checks (false errors on a legitimately
    shared encoder); fresh batches have the probe's distribution but not its samples.
    """
    check_batch_size(shape)
    probe_x = random_inputs(shape, seed)
    uses = {"probe": f"one standard-normal batch of {shape[0]} (seed {seed})"}
    train = None
    if train_steps > 0:
        classes = class_count(model, backend, probe_x)
        train = _random_batches(shape, classes, seed)
        uses["training steps"] = (
            f"{train_steps} fresh standard-normal batches (seeds {seed + 1}..{seed + train_steps}) "
            f"with random labels over {classes} classes, none of them the probe"
        )
    return Source(probe_x, None, train, "(standard normal)", uses)


def _random_batches(shape: tuple[int, ...], classes: int, seed: int) -> Iterator[Batch]:
    for step in itertools.count(1):
        rng = np.random.default_rng(seed + step)
        x = rng.standard_normal(shape, dtype=np.float32)
        yield x, rng.integers(0, classes, size=shape[0]).astype(np.int64)


# -- --data mnist | fashion-mnist ---------------------------------------------------------

# Shapes an MNIST model may expect, tried in this order (per sample); the last one is
# channels-last, as Flax's convolutions (and Keras's by default) take images.
MNIST_SHAPES: tuple[tuple[int, ...], ...] = ((784,), (1, 28, 28), (28, 28), (28, 28, 1))


def fit_shape(model: Any, backend: Backend, flat: np.ndarray) -> tuple[int, ...]:
    """The per-sample MNIST shape that ``model`` accepts, tried on two samples (each on a
    throwaway copy: a Lazy module takes its shapes from the first batch it sees)."""
    for shape in MNIST_SHAPES:
        if backend.runs_on(model, flat[:2].reshape((2,) + shape)):
            return shape
    tried = ", ".join("(N," + ",".join(map(str, s)) + ")" for s in MNIST_SHAPES)
    raise InputError(
        f"the model accepts none of the MNIST shapes {tried}; give the shape it expects with "
        "--input-shape instead of --data."
    )


def _load_builtin(name: str, data_dir: str | None) -> Any:
    from bnlab.data import load_dataset

    try:
        return load_dataset(name, data_dir)
    except Exception as err:
        raise InputError(
            f"could not load {BUILTIN[name]} ({quote_error(err)}); "
            "point --data-dir at the folder with its four IDX .gz files."
        ) from err


def _in_batches(x: np.ndarray, y: np.ndarray, size: int, shape: tuple[int, ...]) -> list[Batch]:
    return [(x[i : i + size].reshape((-1,) + shape), y[i : i + size]) for i in range(0, len(x), size)]


def _shuffled_epochs(indices: np.ndarray, size: int, seed: int, take: Callable[[np.ndarray], Batch]) -> Iterator[Batch]:
    """Batches of ``size`` of ``indices`` in shuffled epochs, full batches only, endlessly."""
    rng = np.random.default_rng(seed)
    full = len(indices) // size
    while True:
        order = rng.permutation(indices)
        for b in range(full):
            yield take(order[b * size : (b + 1) * size])


def builtin_source(name: str, model: Any, backend: Backend, data_dir: str | None, batch_size: int, seed: int) -> Source:
    """Training split for steps and re-estimation, test split for the probe and evaluation."""
    from bnlab.data import to_float

    label = BUILTIN[name]
    data = _load_builtin(name, data_dir)
    train_x, test_x = to_float(data.train_images), to_float(data.test_images)
    train_y = np.asarray(data.train_labels).astype(np.int64)
    test_y = np.asarray(data.test_labels).astype(np.int64)
    if batch_size > len(test_x):
        raise InputError(f"--batch-size {batch_size} is larger than the {label} test set ({len(test_x)}).")
    shape = fit_shape(model, backend, test_x)
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(test_x))[:batch_size]
    full = len(train_x) // batch_size

    def train_epochs() -> Iterator[Batch]:
        return _shuffled_epochs(
            np.arange(len(train_x)), batch_size, seed, lambda idx: (train_x[idx].reshape((-1,) + shape), train_y[idx])
        )

    def one_pass() -> Iterable[Batch]:
        return itertools.islice(train_epochs(), full)

    return Source(
        probe_x=test_x[pick].reshape((batch_size,) + shape),
        probe_y=test_y[pick],
        train_batches=train_epochs(),
        description=f"({label} test images)",
        uses={
            "probe": f"{batch_size} {label} test images (seed {seed})",
            "training steps": f"{label} training images in shuffled batches of {batch_size}",
            "re-estimation (--fix)": f"one pass over the {label} training set: {full} batches of {batch_size}",
            "evaluation (--fix)": f"the whole {label} test set ({len(test_x)} images)",
        },
        fit_batches=one_pass,
        held_out=_in_batches(test_x, test_y, batch_size, shape),
    )


# -- --data FILE.py:NAME --------------------------------------------------------------------


def _as_numpy(value: Any) -> Any:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        return value.detach().cpu().numpy()
    if hasattr(value, "array") and not isinstance(value, np.ndarray):  # a chainer Variable
        return np.asarray(value.array)
    return value


def _checked_batch(item: Any, index: int, where: str, sample_shape: tuple | None) -> Batch:
    """One ``(inputs, labels)`` batch as float32 / int64 arrays, or an InputError."""
    fix = f"{where} must give (inputs, labels) pairs: float inputs (N, ...), integer labels (N,)."
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise InputError(
            f"batch {index + 1} of {where} is of type {type(item).__name__}, not an (inputs, labels) pair. {fix}"
        )
    x, y = (_as_numpy(part) for part in item)
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise InputError(
            f"batch {index + 1} of {where} holds {type(x).__name__} and "
            f"{type(y).__name__}; expected arrays or tensors. {fix}"
        )
    if x.ndim < 2 or not np.issubdtype(x.dtype, np.floating):
        raise InputError(
            f"the inputs of batch {index + 1} of {where} have shape {x.shape} and "
            f"dtype {x.dtype}; expected floating point with a batch dimension. {fix}"
        )
    if y.ndim < 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise InputError(
            f"the labels of batch {index + 1} of {where} have shape {y.shape} and "
            f"dtype {y.dtype}, for {len(x)} inputs; expected one integer class per "
            f"sample. {fix}"
        )
    if sample_shape is not None and x.shape[1:] != sample_shape:
        raise InputError(
            f"batch {index + 1} of {where} has samples of shape {x.shape[1:]}, "
            f"batch 1 had {sample_shape}; every batch must have the same sample "
            "shape."
        )
    if not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise InputError(
            f"the inputs of batch {index + 1} of {where} hold {bad} NaN or "
            "infinite values; clean or normalize the data before the doctor sees it."
        )
    return x.astype(np.float32, copy=False), y.astype(np.int64, copy=False)


def _iterable_of(spec: str) -> tuple[Iterable[Any], str]:
    """The object NAME stands for (called if it is a function), and how to name it."""
    path_text, _, name = spec.rpartition(":")
    path = Path(path_text)
    try:
        module = import_file(path, purpose="the data")
    except LoadError as err:
        raise InputError(f"--data {spec}: {err}") from err
    if not hasattr(module, name):
        public = [
            n
            for n, v in vars(module).items()
            if not n.startswith("_")
            and not inspect.ismodule(v)
            and not ((inspect.isclass(v) or inspect.isfunction(v)) and v.__module__ != module.__name__)
        ]
        raise InputError(
            f"--data {spec}: {path} has no attribute {name!r}. NAME must be a "
            "function with no arguments returning (inputs, labels) batches, or such "
            f"an iterable (a DataLoader). Names defined there: "
            f"{', '.join(public) or 'none'}."
        )
    obj = getattr(module, name)
    if callable(obj) and not hasattr(obj, "__iter__"):
        where = f"{spec}()"
        try:
            obj = obj()
        except Exception as err:
            raise InputError(
                f"calling {where} raised {quote_error(err)}. NAME must be callable with no arguments."
            ) from err
    else:
        where = spec
    if isinstance(obj, (str, bytes)) or not hasattr(obj, "__iter__"):
        raise InputError(
            f"{where} is of type {type(obj).__name__}, not an iterable of "
            "(inputs, labels) batches (a list, a generator or a DataLoader)."
        )
    return obj, where


def file_source(spec: str, batch_size: int | None, max_batches: int) -> Source:
    """Batches from the user's ``FILE.py:NAME``, split into training and held-out ones."""
    obj, where = _iterable_of(spec)
    batches: list[Batch] = []
    sample_shape = None
    kept, limit = 0, memory_limit()
    try:
        for index, item in enumerate(itertools.islice(iter(obj), max_batches)):
            batch = _checked_batch(item, index, where, sample_shape)
            sample_shape = batch[0].shape[1:]
            batches.append(batch)
            kept += batch[0].nbytes + batch[1].nbytes
            if kept > limit:
                raise InputError(
                    f"the first {index + 1} batches of {where} already take {_gib(kept)}, more than "
                    f"the {_gib(limit)} (1/{MEMORY_SHARE} of this machine's memory) the doctor keeps "
                    "in memory; lower --max-batches or the batch size of your data."
                )
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"iterating over {where} raised {quote_error(err)} (after {len(batches)} batches).") from err
    if len(batches) < 2:
        raise InputError(
            f"{where} gave {len(batches)} batch{'es' if len(batches) != 1 else ''}; "
            "the doctor needs at least 2: training and re-estimation use most of "
            "them, one in six (at least one) is held out for the probe."
        )
    held = max(1, len(batches) // HELD_OUT_SHARE)
    train, held_out = batches[:-held], batches[-held:]
    probe_x, probe_y = held_out[0]
    if batch_size:
        probe_x, probe_y = probe_x[:batch_size], probe_y[:batch_size]
    n_train, n = len(train), len(batches)
    capped = f" (read at most {max_batches}: --max-batches)" if n == max_batches else ""
    return Source(
        probe_x=probe_x,
        probe_y=probe_y,
        train_batches=train,
        description=f"(batch {n_train + 1} of {where}, held out)",
        uses={
            "read": f"{n} batches from {where}{capped}",
            "training steps": f"batches 1-{n_train} (cycled)",
            "probe": f"batch {n_train + 1} (held out)",
            "re-estimation (--fix)": f"batches 1-{n_train}",
            "evaluation (--fix)": f"batches {n_train + 1}-{n} (held out)",
        },
        fit_batches=lambda: train,
        held_out=held_out,
    )


# -- --data FILE.npz | FILE.npz:X,Y | FILE.npy -----------------------------------------------

ARRAY_SUFFIXES = (".npz", ".npy")
# Key pairs (inputs, labels) recognised in an .npz archive without a :X,Y suffix.
KEY_PAIRS: tuple[tuple[str, str], ...] = (
    ("x", "y"),
    ("X", "Y"),
    ("inputs", "labels"),
    ("images", "labels"),
    ("data", "target"),
)
NAME_KEYS = "name them after the file: FILE.npz:INPUTS,LABELS (or FILE.npz:INPUTS for inputs only)"
Header = tuple[tuple[int, ...], bool, np.dtype]


def is_array_file(text: str) -> bool:
    """``--data`` names a numpy file: ``FILE.npy``, ``FILE.npz`` or ``FILE.npz:X,Y``."""
    head, sep, _ = text.rpartition(":")
    return (head if sep and head.endswith(".npz") else text).endswith(ARRAY_SUFFIXES)


def absolute_array_spec(spec: str) -> str:
    """``FILE.npz[:X,Y]`` / ``FILE.npy`` with FILE made absolute (the model's import may chdir)."""
    head, sep, keys = spec.rpartition(":")
    if sep and head.endswith(".npz"):
        return f"{os.path.abspath(head)}:{keys}"
    return os.path.abspath(spec)


def _split_array_spec(spec: str) -> tuple[Path, list[str] | None]:
    """``FILE.npz:x,y`` -> (FILE.npz, ["x", "y"]); ``FILE.npy`` -> (FILE.npy, None)."""
    head, sep, keys = spec.rpartition(":")
    if sep and head.endswith(".npz"):
        names = [k.strip() for k in keys.split(",")]
        if not 1 <= len(names) <= 2 or not all(names):
            raise InputError(
                f"--data {spec}: after FILE.npz: give the key of the inputs and, optionally, of "
                "the labels, separated by a comma (FILE.npz:x,y or FILE.npz:x)."
            )
        return Path(head), names
    return Path(spec), None


def _read_header(stream: IO[bytes]) -> Header:
    """Shape, Fortran order and dtype from an .npy header (no data is read, nothing unpickled)."""
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(stream)
    return tuple(shape), bool(fortran), np.dtype(dtype)


def _header(path: Path, member: zipfile.ZipInfo) -> Header:
    with zipfile.ZipFile(path) as archive, archive.open(member) as stream:
        return _read_header(stream)


def _npz_member(path: Path, member: zipfile.ZipInfo, limit: int) -> np.ndarray:
    """One array of an .npz: memory-mapped where stored uncompressed (numpy.savez), read
    into memory otherwise (numpy.savez_compressed) if it fits; never unpickled."""
    with zipfile.ZipFile(path) as archive, archive.open(member) as stream:
        shape, fortran, dtype = _read_header(stream)
        header = stream.tell()
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    if member.compress_type == zipfile.ZIP_STORED and math.prod(shape) > 0:
        with path.open("rb") as raw:  # the member's bytes start after its local file header
            raw.seek(member.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", raw.read(4))
        offset = member.header_offset + 30 + name_len + extra_len + header
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
    size = math.prod(shape) * dtype.itemsize
    if size > limit:
        raise InputError(
            f"--data {path}: the array {member.filename.removesuffix('.npy')!r} is compressed and "
            f"would take {_gib(size)} in memory, more than the {_gib(limit)} the doctor allows; "
            "save it uncompressed (numpy.savez or numpy.save), which the doctor maps from disk."
        )
    with zipfile.ZipFile(path) as archive, archive.open(member) as stream:
        return np.lib.format.read_array(stream, allow_pickle=False)


def _describe(arrays: dict[str, zipfile.ZipInfo], path: Path) -> str:
    """``x (6000, 784) float32, y (6000,) int64``: the archive's keys, shapes and dtypes."""
    parts = []
    for key, member in arrays.items():
        shape, _, dtype = _header(path, member)
        parts.append(f"{key} {shape} {dtype}")
    return ", ".join(parts) or "no arrays"


def _pick_keys(arrays: dict[str, zipfile.ZipInfo], path: Path, named: list[str] | None) -> list[str]:
    """The keys of the inputs (and of the labels, if any) in an .npz archive."""
    if named is not None:
        missing = [k for k in named if k not in arrays]
        if missing:
            raise InputError(
                f"--data {path}: the archive has no array {missing[0]!r}; it holds "
                f"{_describe(arrays, path)}. Give keys it has: FILE.npz:INPUTS,LABELS "
                "(or FILE.npz:INPUTS for inputs only)."
            )
        return named
    pairs = [list(pair) for pair in KEY_PAIRS if all(k in arrays for k in pair)]
    if len(pairs) == 1:
        return pairs[0]
    if not pairs and len(arrays) == 1:
        return list(arrays)
    if not pairs and len(arrays) == 2:
        ndims = {k: len(_header(path, m)[0]) for k, m in arrays.items()}
        first, second = sorted(ndims, key=ndims.__getitem__, reverse=True)
        if ndims[first] != ndims[second]:
            return [first, second]
    known = ", ".join("/".join(pair) for pair in KEY_PAIRS)
    raise InputError(
        f"--data {path}: cannot tell which arrays are the inputs and which the labels; the "
        f"archive holds {_describe(arrays, path)}. The doctor recognises the key pairs {known}, "
        f"or two arrays of which the inputs have more dimensions; otherwise {NAME_KEYS}, e.g. "
        f"--data {path}:{next(iter(arrays), 'x')},LABELS."
    )


def _load_arrays(spec: str) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Inputs, labels (None for inputs only) and the keys read, from a numpy file."""
    path, named = _split_array_spec(spec)
    limit = memory_limit()
    if not path.is_file():
        raise InputError(f"--data {spec}: no such file {path}.")
    try:
        if path.suffix == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False), None, "inputs only"
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if m.filename.endswith(".npy")]
        arrays = {m.filename.removesuffix(".npy"): m for m in members}
        keys = _pick_keys(arrays, path, named)
        loaded = [_npz_member(path, arrays[k], limit) for k in keys]
    except InputError:
        raise
    except Exception as err:
        raise InputError(_unreadable(spec, err)) from err
    used = f"inputs {keys[0]!r}" + (f", labels {keys[1]!r}" if len(keys) > 1 else ", no labels")
    return loaded[0], (loaded[1] if len(loaded) > 1 else None), used


def _unreadable(spec: str, err: Exception) -> str:
    # numpy's words for a pickle, or an object array (np.load's mmap_mode, or our own check)
    if any(words in str(err) for words in ("allow_pickle", "Python objects")):
        return (
            f"--data {spec} holds pickled Python objects (an object array), which the doctor "
            "never loads (unpickling runs code); save plain numeric arrays, e.g. "
            "numpy.savez(FILE, x=np.asarray(x, np.float32), y=np.asarray(y, np.int64))."
        )
    return (
        f"--data {spec} is not a readable numpy file ({quote_error(err)}); write it with "
        "numpy.save (.npy: inputs) or numpy.savez (.npz: inputs and labels)."
    )


def _check_arrays(spec: str, x: np.ndarray, y: np.ndarray | None) -> None:
    """One paragraph on arrays the doctor cannot use: dtypes, dimensions, lengths."""
    if x.dtype.kind not in "biuf" or x.ndim < 2:
        raise InputError(
            f"--data {spec}: the inputs have shape {x.shape} and dtype {x.dtype}; expected "
            "numbers (float or integer) with a batch dimension first, like (N, 784)."
        )
    if y is None:
        return
    if y.dtype.kind not in "iu" or y.ndim != 1:
        raise InputError(
            f"--data {spec}: the labels have shape {y.shape} and dtype {y.dtype}; expected one "
            "integer class per sample, shape (N,)."
        )
    if len(y) != len(x):
        raise InputError(
            f"--data {spec}: {len(x)} inputs but {len(y)} labels; the two arrays must have the "
            "same length (one label per sample)."
        )


def _labels_needed(spec: str, why: str) -> InputError:
    use = "evaluates the repair's accuracy" if why == "--fix" else "trains a copy of the model with cross-entropy"
    return InputError(
        f"--data {spec} has no labels, and {why} needs them (the doctor {use}). Give an .npz with "
        "inputs and labels (numpy.savez(FILE, x=inputs, y=labels), or FILE.npz:INPUTS,LABELS), "
        "or only probe the model with --train-steps 0 (the default with --checkpoint)."
    )


def _validate(spec: str, x: np.ndarray, labels: np.ndarray, size: int) -> None:
    """Every sample through the batch checks once (NaN, dtypes), a batch at a time: a
    memory-mapped file is never held whole in memory."""
    for index, start in enumerate(range(0, len(x), size)):
        rows = slice(start, start + size)
        where = f"{spec} (samples {start}-{min(start + size, len(x)) - 1})"
        _checked_batch((np.asarray(x[rows], np.float32), labels[rows]), index, where, None)


def array_source(
    spec: str,
    model: Any,
    backend: Backend,
    batch_size: int,
    seed: int,
    labels_for: str | None,
) -> Source:
    """Inputs (and labels) from a numpy file; one sixth of the samples, drawn at random,
    held out for the probe and the evaluation, the rest for training and re-estimation.

    ``labels_for``: what needs labels in this run (e.g. "--train-steps 60"), or None."""
    x, y, keys = _load_arrays(spec)
    _check_arrays(spec, x, y)
    if y is None and labels_for:
        raise _labels_needed(spec, labels_for)
    n = len(x)
    held = n // HELD_OUT_SHARE
    if held < 1:
        raise InputError(f"--data {spec} holds {n} samples; the doctor needs at least {HELD_OUT_SHARE}.")
    size = min(batch_size, held)
    check_batch_size((size,) + tuple(x.shape[1:]))
    held_bytes = held * math.prod(x.shape[1:]) * np.dtype(np.float32).itemsize
    if held_bytes > memory_limit():
        raise InputError(
            f"--data {spec}: its held-out sixth ({held} samples) would take {_gib(held_bytes)} as "
            f"float32, more than the {_gib(memory_limit())} the doctor keeps in memory; give a "
            "file with fewer samples (a few thousand are enough)."
        )
    labels = np.asarray(y) if y is not None else np.zeros(n, np.int64)  # zeros: for the checks only
    _validate(spec, x, labels, size)
    shape = tuple(x.shape[1:])
    if math.prod(shape) == math.prod(MNIST_SHAPES[0]):  # MNIST-sized samples, flat or as images
        shape = fit_shape(model, backend, np.array(x[:2], np.float32).reshape(2, -1))
    order = np.random.default_rng(seed).permutation(n)
    held_idx, train_idx = np.sort(order[:held]), order[held:]
    full = len(train_idx) // size  # >= 1: five sixths of the samples, batches of at most one sixth

    def batch(idx: np.ndarray) -> Batch:
        # sorted rows: a memory-mapped file is read forward
        rows = np.sort(idx)
        return np.asarray(x[rows], np.float32).reshape((len(rows),) + shape), labels[rows].astype(np.int64)

    def train_epochs() -> Iterator[Batch]:
        return _shuffled_epochs(train_idx, size, seed + 1, batch)

    held_out = [batch(held_idx[i : i + size]) for i in range(0, held, size)]
    probe_x, probe_y = held_out[0]
    cast = "" if x.dtype == np.float32 else f"; {x.dtype} cast to float32, values unchanged"
    return Source(
        probe_x=probe_x,
        probe_y=probe_y if y is not None else None,
        train_batches=train_epochs() if y is not None else None,
        description=f"(held-out samples of {spec})",
        uses={
            "read": f"{n} samples from {spec} ({keys}{cast})",
            "training steps": f"the other {len(train_idx)} samples in shuffled batches of {size}",
            "probe": f"{size} of {held} held-out samples (one sixth, seed {seed})",
            "re-estimation (--fix)": f"one pass over the training samples: {full} batches of {size}",
            "evaluation (--fix)": f"the {held} held-out samples",
        },
        fit_batches=lambda: itertools.islice(train_epochs(), full),
        held_out=held_out,
    )


def parse_data(text: str) -> str:
    """Validate the ``--data`` value: a built-in data set, a numpy file or ``FILE.py:NAME``."""
    if text in BUILTIN or is_array_file(text):
        return text
    path, sep, name = text.rpartition(":")
    if not sep or not path or not name.isidentifier():
        raise InputError(
            f"--data must be {' or '.join(BUILTIN)} or FILE.py:NAME (a function returning "
            "(inputs, labels) batches), or a numpy file: FILE.npz (inputs and labels, "
            f"FILE.npz:X,Y to name their keys) or FILE.npy (inputs only); got {text!r}."
        )
    return text
