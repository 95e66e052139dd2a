"""The question's TensorFlow program, run by TensorFlow itself (``--engine tensorflow``).

The graph is TF1's, built with ``tf.compat.v1`` in its own ``tf.Graph`` (no process-wide
switch such as ``disable_eager_execution``): ``tf.layers.dense`` and
``tf.layers.batch_normalization(training=training, momentum=...)`` as the question wrote
them, ``sparse_softmax_cross_entropy_with_logits``, ``tf.train.AdamOptimizer`` and the
``UPDATE_OPS`` run in the same ``sess.run`` as the training op. Around the graph everything
is bnlab's, shared with the other engines: the data, the minibatch order (``epoch_orders``
then ``split_batches``; ``batching="array-split"`` is the program's ``np.array_split``), the
table, the run directory and the checkpoint, which is saved in the torch ``MLP``'s keys so
``load_checkpoint``, the doctor and ``--fix`` read a TF run like a torch one.

How bnlab's settings map onto TF1:

* ``bn_momentum`` (PyTorch's, weight of the new value) becomes TF's ``momentum = 1 - bn_momentum``.
* ``norm="shared"`` (the question's bug) is ONE named ``batch_normalization`` scope, ``bn``,
  called after every hidden layer with ``reuse=True``: one set of variables, two update
  ops per step. The second call's updates are made to run after the first's (a control
  dependency), as the calls run in Chainer and PyTorch; TF's executor is otherwise free to
  read the moving average for both updates before either writes.
* ``train_metrics="eval-after-step"`` is the program's ``loss.eval`` / ``accuracy.eval``
  after the step (``training`` left at its default False: moving statistics);
  ``"train-forward"`` fetches loss and accuracy of the training forward in the step's run.
* ``init="tf-glorot-uniform"`` is TF 1.x's default kernel initializer of ``tf.layers.dense``
  (``glorot_uniform_initializer``, zero bias);
  ``"chainer-he-normal"`` is ``variance_scaling_initializer(2.0, "fan_in", untruncated
  normal)``, Chainer's ``HeNormal``. Both draw from the graph seed ``train.seed``.
* ``adam_eps_mode="chainer"`` is the only placement TF1's Adam has (eps added to sqrt(v)
  before the bias correction).
* The moving variance: ``tf.layers.batch_normalization`` on 2-D input stores the BIASED
  batch variance, whatever the config says. The Chainer-derived presets (``running_var=
  "unbiased"``) therefore run with TF's own BN, which differs from Chainer's in the running
  variance by the factor (n-1)/n = 0.999 at batch 1000; environment.json says so.

Environment: ``tf.layers`` lives in the ``tf_keras`` package, which TF uses only when
``TF_USE_LEGACY_KERAS=1`` is set before TensorFlow is imported; ``import_tensorflow`` sets
it. TensorFlow is imported only here, when the engine runs. Threads: the session runs
with ``intra_op_parallelism_threads = inter_op_parallelism_threads = train.threads``
(0: TF's defaults), so float rounding and the history do not depend on the machine's cores.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import torch

from bnlab.config import EpochRecord, ModelConfig, RunConfig, TrainConfig
from bnlab.conventions import convert
from bnlab.engines.common import (
    RunResult,
    diverged,
    environment,
    epoch_orders,
    first_bad,
    numpy_arrays,
    split_batches,
    torch_result,
)
from bnlab.errors import MissingExtra, UsageError
from bnlab.models import build_model
from bnlab.rundir import RunRecorder
from bnlab.tflog import quiet_tensorflow_logging

TF_VERSION = "2.21.0"
MISSING_TENSORFLOW = (
    "The tensorflow engine needs TensorFlow with the tf_keras package (for tf.layers), which is not "
    "importable here ({err}). Install the extra into bnlab's virtual environment, in this order: "
    f'`pip install "tensorflow-cpu=={TF_VERSION}"` then `pip install --no-deps tf_keras=={TF_VERSION}` '
    "(--no-deps: tf_keras otherwise pulls a second, full tensorflow over tensorflow-cpu); or train with "
    "--engine torch."
)
LEGACY_KERAS_NEEDED = (
    "TensorFlow was imported before bnlab's tensorflow engine could set TF_USE_LEGACY_KERAS=1, and "
    "without it tf.compat.v1.layers is not available ({err}). Set TF_USE_LEGACY_KERAS=1 in the "
    "environment before starting Python (or before the first `import tensorflow`)."
)
BN_VARIANCE_NOTE = (
    "tf.layers.batch_normalization (non-fused, 2-D input) stores the biased batch variance in moving_variance"
)


class TensorFlowMissing(MissingExtra):
    """TensorFlow or tf_keras cannot be imported (one paragraph, exit 2)."""


def import_tensorflow() -> ModuleType:
    """TensorFlow, imported on first use, with tf.layers (tf_keras) enabled."""
    if "tensorflow" not in sys.modules:
        # tf.compat.v1.layers comes from tf_keras only when this is set at import time.
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
    quiet_tensorflow_logging()  # no C++ banner on every run
    try:
        import tensorflow as tf
    except ImportError as err:
        raise TensorFlowMissing(MISSING_TENSORFLOW.format(err=err)) from err
    try:
        tf.compat.v1.layers.dense  # noqa: B018 - resolves the lazily loaded tf_keras module
        tf.compat.v1.layers.batch_normalization  # noqa: B018
    except (ImportError, AttributeError) as err:
        template = MISSING_TENSORFLOW if _tf_keras_missing() else LEGACY_KERAS_NEEDED
        raise TensorFlowMissing(template.format(err=err)) from err
    return tf


def _tf_keras_missing() -> bool:
    return _missing("tf_keras")


def _missing(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


# ------------------------------------------------------------------ what the engine can do


def check_config(cfg: RunConfig) -> None:
    """Raise UsageError, naming the field and the fix, for settings TF1's program cannot run,
    and TensorFlowMissing when TensorFlow or tf_keras is not installed (found without
    importing them, so that nothing is written for a run that cannot start)."""
    missing = [name for name in ("tensorflow", "tf_keras") if _missing(name)]
    if missing:
        raise TensorFlowMissing(MISSING_TENSORFLOW.format(err=f"no module named {', '.join(missing)}"))
    m, t = cfg.model, cfg.train
    fix = "train this preset with --engine torch, which implements it"
    problems = [
        (
            m.init == "torch-default",
            "model.init='torch-default': the tensorflow engine initializes with TF's own initializers; "
            "--set init=tf-glorot-uniform (tf.layers.dense's default) or --set init=chainer-he-normal, or " + fix,
        ),
        (
            t.adam_eps_mode != "chainer",
            f"train.adam_eps_mode={t.adam_eps_mode!r}: tf.train.AdamOptimizer adds eps to sqrt(v) before "
            "the bias correction, which is adam_eps_mode='chainer'; --set adam_eps_mode=chainer or " + fix,
        ),
        (
            t.device not in ("auto", "cpu"),
            (
                f"train.device={t.device!r}: the tensorflow engine runs on the CPU (tensorflow-cpu); use "
                "--device cpu (or auto), or --engine torch for a GPU"
            ),
        ),
    ]
    messages = [msg for bad, msg in problems if bad]
    if messages:
        raise UsageError(f"Preset {cfg.preset!r} cannot run with --engine tensorflow: " + "; ".join(messages) + ".")


def tf_momentum(model_cfg: ModelConfig) -> float:
    """TF1's ``momentum`` (weight of the OLD value) for bnlab's PyTorch-style ``bn_momentum``."""
    return convert(model_cfg.bn_momentum, "torch", "tf1")


def as_tf_float32(value: float) -> float:
    """``value`` as TF uses it: TF converts Python floats (lr, betas, eps, BN decay) to float32
    tensors, and a float64 graph casts those back, so only float32's digits survive."""
    return float(np.float32(value))


# ------------------------------------------------------------------------------ the graph


def _dense_name(i: int, n_layers: int) -> str:
    # The question's names: hidden1, hidden2, ..., outputs.
    return "outputs" if i == n_layers else f"hidden{i}"


@dataclass
class TFProgram:
    """The built graph, its session and the handles bnlab needs (one per run)."""

    cfg: ModelConfig
    graph: Any
    session: Any
    x: Any
    y: Any
    training: Any
    loss: Any
    accuracy: Any
    train_op: Any
    update_ops: list[Any]
    variables: dict[str, Any]  # torch state_dict key -> tf.Variable (num_batches_tracked excluded)
    calls_per_step: dict[str, int]  # BN name -> training calls per step (2 for the shared bn)
    bn_calls: dict[str, int] = field(default_factory=dict)
    trace_fetches: list[tuple[str, Any]] = field(default_factory=list)  # per BN call: (name, [4, k] stats)
    _feeds: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        self.session.close()


@contextlib.contextmanager
def _quiet_deprecations(tf: ModuleType) -> Iterator[None]:
    """tf.layers and tf.compat.v1 warn on every use that they are deprecated: the point here is
    to run that very API, so those warnings are silenced while the graph is built."""
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def _initializer(tf1: ModuleType, init: str) -> Any:
    if init == "chainer-he-normal":
        return tf1.variance_scaling_initializer(scale=2.0, mode="fan_in", distribution="untruncated_normal")
    # TF 1.x's default for tf.layers.dense (a variable scope's glorot_uniform_initializer),
    # named explicitly: tf_keras's own default draws from a seed outside the graph's, so
    # the same seed would not give the same weights.
    return tf1.glorot_uniform_initializer()


def build_program(
    model_cfg: ModelConfig, train_cfg: TrainConfig, *, dtype: type = np.float32, trace_channels: int = 0
) -> TFProgram:
    """The question's TF graph for ``model_cfg`` (weights from the graph seed ``train_cfg.seed``),
    its Adam step, and a session on ``train_cfg.threads`` threads. ``dtype`` float64 is for the
    parity tests; training runs float32 as the program does."""
    tf = import_tensorflow()
    tf1 = tf.compat.v1
    tf_dtype = tf.as_dtype(np.dtype(dtype))
    graph = tf.Graph()
    with graph.as_default(), _quiet_deprecations(tf):
        tf1.set_random_seed(train_cfg.seed)
        x = tf1.placeholder(tf_dtype, shape=(None, model_cfg.widths[0]), name="X")
        y = tf1.placeholder(tf.int32, shape=(None,), name="y")
        training = tf1.placeholder_with_default(False, shape=(), name="training")
        with tf1.name_scope("dnn"):
            logits, norms, traces = _forward(tf1, model_cfg, x, training, trace_channels)
        with tf1.name_scope("loss"):
            xentropy = tf1.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            loss = tf1.reduce_mean(xentropy, name="loss")
        with tf1.name_scope("train"):
            optimizer = tf1.train.AdamOptimizer(
                learning_rate=train_cfg.lr,
                beta1=train_cfg.adam_beta1,
                beta2=train_cfg.adam_beta2,
                epsilon=train_cfg.adam_eps,
            )
            train_op = optimizer.minimize(loss)
        with tf1.name_scope("eval"):
            correct = tf1.nn.in_top_k(tf1.cast(logits, tf.float32), y, 1)
            accuracy = tf1.reduce_mean(tf1.cast(correct, tf.float32))
        update_ops = tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)
        variables = _torch_named_variables(tf1, model_cfg)
        init = tf1.global_variables_initializer()
    threads = train_cfg.threads
    config = tf1.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=threads)
    # Keep each cond an If op that starts when ALL its inputs are ready. Lowered to
    # Switch/Merge (TF's default), the moving-average read inside a BN update waits only
    # for the variable's handle, so a shared BN's second update would read the average
    # before the first update wrote it (see the module docstring).
    config.experimental.disable_functional_ops_lowering = True
    session = tf1.Session(graph=graph, config=config)
    session.run(init)
    return TFProgram(
        model_cfg,
        graph,
        session,
        x,
        y,
        training,
        loss,
        accuracy,
        train_op,
        update_ops,
        variables,
        norms,
        {name: 0 for name in norms},
        traces,
    )


def _forward(
    tf1: ModuleType, cfg: ModelConfig, x: Any, training: Any, trace_channels: int
) -> tuple[Any, dict[str, int], list[tuple[str, Any]]]:
    """Dense -> [BN] -> ReLU per hidden layer, dense logits [-> BN]. Returns the logits, the
    BN names with their calls per step, and the trace tensors (empty when not tracing)."""
    n_layers = len(cfg.widths) - 1
    init = _initializer(tf1, cfg.init)
    calls: dict[str, int] = {}
    traces: list[tuple[str, Any]] = []
    after_previous: dict[str, list[Any]] = {}  # BN name -> ops the next call of it must follow

    def batch_norm(h: Any, name: str) -> Any:
        reuse = name in calls
        with tf1.control_dependencies(after_previous.get(name, [])):
            before = set(tf1.get_collection(tf1.GraphKeys.UPDATE_OPS))
            out = tf1.layers.batch_normalization(
                h, training=training, momentum=tf_momentum(cfg), epsilon=cfg.bn_eps, name=name, reuse=reuse or None
            )
            updates = [op for op in tf1.get_collection(tf1.GraphKeys.UPDATE_OPS) if op not in before]
        calls[name] = calls.get(name, 0) + 1
        with tf1.control_dependencies(updates):
            # The moving statistics right after this call's updates (read only when traced).
            moving = [
                tf1.identity(_variable(tf1, f"{name}/{v}:0").read_value()) for v in ("moving_mean", "moving_variance")
            ]
        after_previous[name] = updates + [m.op for m in moving]
        if trace_channels:
            k = min(trace_channels, int(h.shape[1]))
            mean, var = tf1.nn.moments(h[:, :k], axes=[0])
            traces.append((name, tf1.stack([mean, var, moving[0][:k], moving[1][:k]])))
        return out

    h = x
    for i in range(1, n_layers):
        h = tf1.layers.dense(h, cfg.widths[i], kernel_initializer=init, name=_dense_name(i, n_layers))
        norm = {"per-layer": f"bn{i}", "shared": "bn"}.get(cfg.norm)
        if norm is not None:
            h = batch_norm(h, norm)
        h = tf1.nn.relu(h)
    logits = tf1.layers.dense(h, cfg.widths[-1], kernel_initializer=init, name=_dense_name(n_layers, n_layers))
    if cfg.logits_norm:
        logits = batch_norm(logits, "bn_logits")
    return logits, calls, traces


def _variable(tf1: ModuleType, name: str) -> Any:
    found = [v for v in tf1.global_variables() if v.name == name]
    if len(found) != 1:
        raise KeyError(f"the graph has no single variable {name!r}")
    return found[0]


_BN_SLOTS = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


def _torch_keys(model_cfg: ModelConfig) -> list[str]:
    # The torch MLP itself is the one source of key names and their order.
    return list(build_model(model_cfg, seed=0).state_dict().keys())


def _torch_named_variables(tf1: ModuleType, cfg: ModelConfig) -> dict[str, Any]:
    n_layers = len(cfg.widths) - 1
    out: dict[str, Any] = {}
    for key in _torch_keys(cfg):
        module, _, slot = key.rpartition(".")
        if slot == "num_batches_tracked":
            continue
        if module.startswith("bn"):
            out[key] = _variable(tf1, f"{module}/{_BN_SLOTS[slot]}:0")
        else:
            layer = _dense_name(int(module[1:]), n_layers)
            out[key] = _variable(tf1, f"{layer}/{'kernel' if slot == 'weight' else 'bias'}:0")
    return out


def load_torch_state(program: TFProgram, state_dict: dict[str, torch.Tensor]) -> None:
    """Set the graph's variables from a torch ``MLP`` state_dict (shapes must match exactly)."""
    expected = set(_torch_keys(program.cfg))
    if set(state_dict) != expected:
        missing, extra = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        raise ValueError(f"state_dict does not fit this model: missing {missing}, unexpected {extra}")
    with program.graph.as_default():
        _assign_all(program, state_dict)


def _assign_all(program: TFProgram, state_dict: dict[str, torch.Tensor]) -> None:
    feeds, inits = {}, []
    for key, tensor in state_dict.items():
        if key.endswith("num_batches_tracked"):
            program.bn_calls[key.rpartition(".")[0]] = int(tensor)
            continue
        var = program.variables[key]
        value = tensor.detach().cpu().numpy()
        value = value.T if key.startswith("l") and key.endswith(".weight") else value  # torch (out, in)
        if tuple(var.shape) != value.shape:
            raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit TF's {tuple(var.shape)}")
        # Re-running the initializer with its initial value fed sets any variable kind.
        feeds[var.initial_value] = value.astype(var.dtype.as_numpy_dtype)
        inits.append(var.initializer)
    program.session.run(inits, feeds)


def tf_state_dict(program: TFProgram) -> dict[str, torch.Tensor]:
    """The graph's state as a torch ``MLP`` state_dict (same keys, same order)."""
    values = program.session.run(program.variables)
    state: dict[str, torch.Tensor] = {}
    for key in _torch_keys(program.cfg):
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(program.bn_calls[key.rpartition(".")[0]], dtype=torch.long)
            continue
        value = np.array(values[key], copy=True)
        state[key] = torch.from_numpy(value.T.copy() if key.startswith("l") and key.endswith(".weight") else value)
    return state


# --------------------------------------------------------------------------- one step


def train_step(
    program: TFProgram, xb: np.ndarray, yb: np.ndarray, train_metrics: str, trace: list[np.ndarray] | None = None
) -> tuple[float, float]:
    """One Adam step on one minibatch, as the program runs it; returns (loss, accuracy).

    ``sess.run([training_op, extra_update_ops], training=True)``, then, for
    ``"eval-after-step"``, the program's ``loss.eval`` / ``accuracy.eval`` on the same batch
    (inference mode); for ``"train-forward"`` the step's own forward pass. With ``trace``,
    each BN call's statistics are appended to it.
    """
    p = program
    feed = {p.x: xb, p.y: yb, p.training: True}
    fetches: dict[str, Any] = {"train": p.train_op, "updates": p.update_ops}
    if train_metrics == "train-forward":
        fetches["metrics"] = [p.loss, p.accuracy]
    if trace is not None:
        fetches["trace"] = [t for _, t in p.trace_fetches]
    out = p.session.run(fetches, feed)
    for name, count in p.calls_per_step.items():
        p.bn_calls[name] += count
    if trace is not None:
        trace.extend(out["trace"])
    if train_metrics == "train-forward":
        loss, acc = out["metrics"]
    else:
        loss, acc = p.session.run([p.loss, p.accuracy], {p.x: xb, p.y: yb})
    return float(loss), float(acc)


def evaluate(program: TFProgram, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Loss and accuracy with the moving statistics (``training`` at its default False)."""
    loss, acc = program.session.run([program.loss, program.accuracy], {program.x: x, program.y: y})
    return float(loss), float(acc)


# ------------------------------------------------------------------------------ tracing


class TFBNTrace:
    """The torch engine's BN trace layout (values, module, site, module_names) from TF's
    per-call fetches: batch mean / biased variance of the BN input, moving mean / variance
    right after that call's update, for the first few channels."""

    def __init__(self, program: TFProgram) -> None:
        self.names = list(program.calls_per_step)
        self.calls = [name for name, _ in program.trace_fetches]
        self.sites: list[int] = []
        seen: dict[str, int] = {}
        for name in self.calls:
            self.sites.append(seen.get(name, 0))
            seen[name] = seen.get(name, 0) + 1
        self.rows: list[np.ndarray] = []
        self.steps = 0

    def step_rows(self) -> list[np.ndarray]:
        self.steps += 1
        return self.rows

    def close(self) -> dict[str, np.ndarray]:
        channels = self.rows[0].shape[1] if self.rows else 0
        values = np.stack(self.rows).astype(np.float32) if self.rows else np.zeros((0, 4, channels), np.float32)
        module = np.asarray([self.names.index(n) for n in self.calls] * self.steps, dtype=np.int32)
        return {
            "values": values,
            "module": module,
            "site": np.asarray(self.sites * self.steps, dtype=np.int32),
            "module_names": np.asarray(self.names),
        }


# ------------------------------------------------------------------------------ training


def run(
    cfg: RunConfig, data: Any, recorder: RunRecorder, *, initial_state: dict[str, torch.Tensor] | None = None
) -> RunResult:
    """Train ``cfg`` with TensorFlow, reporting through ``recorder`` like the other engines.

    The returned ``RunResult.model`` is a torch ``MLP`` holding the trained TF state.
    """
    check_config(cfg)
    tf = import_tensorflow()
    program = build_program(cfg.model, cfg.train, trace_channels=cfg.train.trace_bn_channels)
    try:
        if initial_state is not None:
            load_torch_state(program, initial_state)
        bn_trace = _train_loop(cfg, data, program, recorder, tf)
        state = tf_state_dict(program)
    finally:
        program.close()
    recorder.finish(state, bn_trace)
    return torch_result(cfg, recorder, state, bn_trace)


def _environment(cfg: RunConfig, data: Any, tf: ModuleType) -> dict[str, Any]:
    import tf_keras

    extra: dict[str, Any] = {
        "engine": "tensorflow",
        "tensorflow": tf.__version__,
        "tf_keras": tf_keras.__version__,
        "torch": torch.__version__,
        "tf_threads": {"intra_op": cfg.train.threads, "inter_op": cfg.train.threads},
    }
    if cfg.model.norm != "none" or cfg.model.logits_norm:
        extra["bn_moving_variance"] = BN_VARIANCE_NOTE + (
            f" (the config's running_var={cfg.model.running_var!r} is another framework's)"
            if cfg.model.running_var != "biased"
            else ""
        )
    return environment("cpu", data, extra)


def _train_loop(
    cfg: RunConfig, data: Any, program: TFProgram, recorder: RunRecorder, tf: ModuleType
) -> dict[str, np.ndarray] | None:
    tc = cfg.train
    x_train, y_train, x_val, y_val = numpy_arrays(data)
    trace = TFBNTrace(program) if tc.trace_bn_channels and program.trace_fetches else None
    recorder.start(_environment(cfg, data, tf))
    for epoch, order in enumerate(epoch_orders(tc.seed, len(x_train), tc.epochs)):
        started = time.perf_counter()
        losses, accs = [], []
        for idx in split_batches(order, tc.batch_size, tc.batching):
            i = idx.numpy()
            loss, acc = train_step(
                program, x_train[i], y_train[i], tc.train_metrics, trace.step_rows() if trace else None
            )
            losses.append(loss)
            accs.append(acc)
        bad = first_bad(losses)
        if bad is not None:
            raise diverged(cfg, epoch, bad, losses[bad])
        val_loss, val_acc = evaluate(program, x_val, y_val)
        recorder.epoch(
            EpochRecord(
                epoch, float(np.mean(losses)), val_loss, float(np.mean(accs)), val_acc, time.perf_counter() - started
            )
        )
    return trace.close() if trace else None
