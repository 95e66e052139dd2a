"""Where the command line's batches come from, and what each batch is used for.

Three sources, each split so that the doctor never judges a model on a batch it trained on:

- ``--input-shape``: the probe is one standard-normal batch; training steps use FRESH
  standard-normal batches (other seeds) with random labels.
- ``--data mnist`` / ``fashion-mnist``: training steps (and re-estimation for ``--fix``)
  use the training split; the probe and the evaluation use the test split.
- ``--data FILE.py:NAME``: NAME (a function with no arguments, or an iterable such as a
  DataLoader) gives ``(inputs, labels)`` batches; the last sixth of them (at least one)
  is held out for the probe and the evaluation, the rest is for training and re-estimation.

Arrays are numpy (float32 inputs, int64 labels); every backend accepts them.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        step_rng = np.random.default_rng(seed)
        while True:  # shuffled epochs, full batches only
            order = step_rng.permutation(len(train_x))
            for b in range(full):
                idx = order[b * batch_size : (b + 1) * batch_size]
                yield train_x[idx].reshape((batch_size,) + shape), train_y[idx]

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


def parse_data(text: str) -> str:
    """Validate the ``--data`` value: a built-in data set or ``FILE.py:NAME``."""
    if text in BUILTIN:
        return text
    path, sep, name = text.rpartition(":")
    if not sep or not path or not name.isidentifier():
        raise InputError(
            f"--data must be {' or '.join(BUILTIN)} or FILE.py:NAME (a function "
            f"returning (inputs, labels) batches); got {text!r}."
        )
    return text
