"""``--data FILE.npz`` / ``FILE.npz:X,Y`` / ``FILE.npy``: numpy arrays on the command line.

The arrays are the real MNIST (``bnlab.data``), saved with numpy.save / numpy.savez in
tmp_path; every bad file is exit 2 with one paragraph naming the problem.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from bnlab.doctor.command import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
QUESTION = f"{EXAMPLES / 'question_torch.py'}:MyModel"
ANSWER = f"{EXAMPLES / 'answer_torch.py'}:MyModel"
SAMPLES = 6000


@pytest.fixture(scope="module")
def mnist(mnist_arrays) -> tuple[np.ndarray, np.ndarray]:
    """6000 MNIST training images (float32, (n, 784), in [0, 1]) and their labels."""
    train_x, train_y, _, _ = mnist_arrays
    return train_x[:SAMPLES], train_y[:SAMPLES]


@pytest.fixture(scope="module")
def npz(mnist, tmp_path_factory) -> Path:
    """The new user's file: images as (n, 1, 28, 28) under x, labels under y."""
    path = tmp_path_factory.mktemp("arrays") / "mnist_small.npz"
    x, y = mnist
    np.savez(path, x=x.reshape(-1, 1, 28, 28), y=y)
    return path


def _doctor(capsys, *args: str) -> tuple[int, dict]:
    code = main([*args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def _findings(report: dict) -> list[tuple[str, str, str]]:
    return [(f["check"], f["severity"], f["where"]) for f in report["findings"]]


def test_question_model_has_the_same_error_as_with_builtin_mnist(npz: Path, capsys) -> None:
    code, report = _doctor(capsys, QUESTION, "--data", str(npz), "--train-steps", "20")
    builtin_code, builtin = _doctor(capsys, QUESTION, "--data", "mnist", "--train-steps", "20")
    assert code == builtin_code == 1
    assert ("shared-bn", "error", "bn") in _findings(report)
    assert _findings(report) == _findings(builtin)
    assert report["probe"]["input_shape"] == [1000, 784]  # (n, 1, 28, 28) fitted to the MLP
    uses = report["data"]
    assert uses["read"] == f"{SAMPLES} samples from {npz} (inputs 'x', labels 'y')"
    assert uses["probe"] == "1000 of 1000 held-out samples (one sixth, seed 0)"
    assert report["summary"]["train_eval"]["acc_train"] > 0.7  # the file's labels were learnt


def test_answer_model_is_healthy(npz: Path, capsys) -> None:
    code, report = _doctor(capsys, ANSWER, "--data", str(npz), "--train-steps", "20")
    assert code == 0
    assert not [f for f in report["findings"] if f["severity"] == "error"]


def test_fix_with_an_npz(npz: Path, tmp_path: Path, capsys) -> None:
    code, report = _doctor(capsys, QUESTION, "--data", str(npz), "--train-steps", "0", "--fix", str(tmp_path / "out"))
    assert code == 1 and report["data"]["evaluation (--fix)"] == "the 1000 held-out samples"
    assert report["repair"]["after"]["samples"] == 1000  # evaluated on the file's labels
    assert 0 <= report["repair"]["after"]["val_acc"] <= 1


def test_keys_named_after_the_file(mnist, tmp_path: Path, capsys) -> None:
    path = tmp_path / "named.npz"
    x, y = mnist
    np.savez(path, pixels=x, digits=y, extra=y)
    assert main([QUESTION, "--data", str(path), "--train-steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "cannot tell which arrays" in err and "pixels (6000, 784) float32" in err
    assert f"--data {path}:pixels,LABELS" in err and err.count("\n") == 1
    code, report = _doctor(capsys, QUESTION, "--data", f"{path}:pixels,digits", "--train-steps", "5")
    assert code == 1 and report["data"]["read"].endswith("(inputs 'pixels', labels 'digits')")


def test_two_unnamed_arrays_inputs_have_more_dimensions(mnist, tmp_path: Path, capsys) -> None:
    path = tmp_path / "positional.npz"
    x, y = mnist
    np.savez_compressed(path, y, x)  # arr_0: labels, arr_1: images; compressed: read, not mapped
    code, report = _doctor(capsys, QUESTION, "--data", str(path), "--train-steps", "5")
    assert code == 1 and "(inputs 'arr_1', labels 'arr_0')" in report["data"]["read"]


def test_npy_inputs_only_probe_without_training(mnist, tmp_path: Path, capsys) -> None:
    path = tmp_path / "x.npy"
    np.save(path, (mnist[0] * 255).round().astype(np.uint8))
    code, report = _doctor(capsys, QUESTION, "--data", str(path), "--train-steps", "0")
    assert code == 1 and ("shared-bn", "error", "bn") in _findings(report)  # sharing needs no training
    assert "uint8 cast to float32, values unchanged" in report["data"]["read"]
    assert "training steps" not in report["data"]


@pytest.mark.parametrize("extra", [[], ["--train-steps", "0", "--fix", "OUT"]])
def test_npy_where_labels_are_needed(mnist, tmp_path: Path, extra: list[str], capsys) -> None:
    path = tmp_path / "x.npy"
    np.save(path, mnist[0])
    extra = [str(tmp_path / "out") if a == "OUT" else a for a in extra]
    assert main([QUESTION, "--data", str(path), *extra]) == 2
    err = capsys.readouterr().err
    why = "--fix" if extra else "--train-steps 60"
    assert f"has no labels, and {why} needs them" in err and "--train-steps 0" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_files_are_memory_mapped(npz: Path, mnist, tmp_path: Path) -> None:
    from bnlab.doctor.sources import _load_arrays

    npy = tmp_path / "x.npy"
    np.save(npy, mnist[0])
    for spec in (str(npz), str(npy)):
        x, _, _ = _load_arrays(spec)
        assert isinstance(x, np.memmap) and x.shape[0] == SAMPLES
    x, y, _ = _load_arrays(str(npz))
    assert np.array_equal(x.reshape(SAMPLES, 784), mnist[0]) and np.array_equal(y, mnist[1])


def _bad_files(tmp: Path, x: np.ndarray, y: np.ndarray) -> dict[str, str]:
    """name -> --data value of one broken file each."""
    (tmp / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip archive")
    np.save(tmp / "truncated.npy", x)
    (tmp / "truncated.npy").write_bytes((tmp / "truncated.npy").read_bytes()[:5000])
    objects = np.empty(2, dtype=object)
    objects[0], objects[1] = x, "a"
    np.save(tmp / "objects.npy", objects, allow_pickle=True)
    np.savez(tmp / "objects.npz", x=objects, y=y)
    (tmp / "pickle.npy").write_bytes(pickle.dumps({"x": x[:10]}))
    np.savez(tmp / "short.npz", x=x, y=y[:-7])
    np.savez(tmp / "text.npz", x=np.array([["a"] * 784] * 12), y=np.zeros(12, np.int64))
    np.savez(tmp / "float_labels.npz", x=x, y=y.astype(np.float32))
    bad = x.copy()
    bad[4321, 5] = np.nan
    np.savez(tmp / "nan.npz", x=bad, y=y)
    np.savez(tmp / "same_dims.npz", a=x[:, :10], b=x[:, 10:20])
    return {p.stem: str(p) for p in tmp.iterdir()} | {"wrong_key": f"{tmp / 'nan.npz'}:x,labels"}


@pytest.mark.parametrize(
    "name, words",
    [
        ("corrupt", "is not a readable numpy file (BadZipFile"),
        ("truncated", "is not a readable numpy file"),
        ("objects", "holds pickled Python objects (an object array), which the doctor never loads"),
        ("pickle", "holds pickled Python objects"),
        ("wrong_key", "the archive has no array 'labels'; it holds x (6000, 784) float32, y (6000,) int64"),
        ("short", "6000 inputs but 5993 labels"),
        ("text", "the inputs have shape (12, 784) and dtype <U1"),
        ("float_labels", "the labels have shape (6000,) and dtype float32"),
        ("nan", "batch 5 of"),
        ("same_dims", "cannot tell which arrays are the inputs and which the labels"),
    ],
)
def test_bad_array_file_is_exit_2_with_one_paragraph(mnist, tmp_path: Path, name: str, words: str, capsys) -> None:
    files = _bad_files(tmp_path, *mnist)
    for spec in [files[name]] + ([str(tmp_path / "objects.npz")] if name == "objects" else []):
        assert main([QUESTION, "--data", spec, "--train-steps", "0"]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and err.count("\n") == 1, err


def test_nan_names_the_samples(mnist, tmp_path: Path, capsys) -> None:
    path = Path(_bad_files(tmp_path, *mnist)["nan"])
    assert main([QUESTION, "--data", str(path), "--batch-size", "500", "--train-steps", "0"]) == 2
    assert f"batch 9 of {path} (samples 4000-4499) hold 1 NaN" in capsys.readouterr().err


def test_npz_suffix_must_name_keys(npz: Path, capsys) -> None:
    assert main([QUESTION, "--data", f"{npz}:x,y,z", "--train-steps", "0"]) == 2
    assert "FILE.npz:x,y or FILE.npz:x" in capsys.readouterr().err


def test_missing_array_file(tmp_path: Path, capsys) -> None:
    assert main([QUESTION, "--data", str(tmp_path / "nope.npz")]) == 2
    assert f"no such file {tmp_path / 'nope.npz'}" in capsys.readouterr().err


def test_help_states_the_inputs_are_unchanged(capsys) -> None:
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "FILE.npz:X,Y" in text and "unchanged except the cast to float32" in text
    assert "allow_pickle=False" in text


def test_large_arrays_are_mapped_compressed_ones_must_fit(mnist, tmp_path: Path, monkeypatch, capsys) -> None:
    """With room for a batch but not for the file, an uncompressed .npz is mapped and runs;
    a compressed one, which has to be read whole, is refused in one paragraph."""
    import bnlab.doctor.sources as sources

    x, y = mnist  # 18.8 MB of float32 inputs; one batch of 1000 is 3.1 MB
    monkeypatch.setattr(sources, "memory_limit", lambda: 8 << 20)
    np.savez(tmp_path / "plain.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "packed.npz", x=x, y=y)
    code, report = _doctor(capsys, QUESTION, "--data", str(tmp_path / "plain.npz"), "--train-steps", "5")
    assert code == 1 and ("shared-bn", "error", "bn") in _findings(report)
    assert main([QUESTION, "--data", str(tmp_path / "packed.npz"), "--train-steps", "5"]) == 2
    err = capsys.readouterr().err
    assert "the array 'x' is compressed and would take 0.0175 GiB in memory" in err and err.count("\n") == 1


def test_npy_with_a_checkpoint_probes_without_labels(mnist, examples_on_path, tmp_path: Path, capsys) -> None:
    """A trained model (--checkpoint) is judged as handed over: no training steps, so
    inputs alone do."""
    import torch
    from answer_torch import MyModel

    torch.save(MyModel().state_dict(), tmp_path / "answer.pt")
    np.save(tmp_path / "x.npy", mnist[0])
    args = [ANSWER, "--data", str(tmp_path / "x.npy"), "--checkpoint", str(tmp_path / "answer.pt")]
    code, report = _doctor(capsys, *args)
    assert code == 0 and report["probe"]["train_steps"] == 0
    assert report["data"]["read"].endswith("(inputs only)")
