"""Every error bnlab means to show a user, with the exit code the command ends with.

The CLI maps errors by class (``BnlabError.exit_code``): 2 for bad flags, bad input files and
missing optional frameworks, 1 for a run that failed or diverged. Anything else that reaches
the CLI is a bug: it keeps its traceback and exits 1, and is never disguised as a usage error.

``UsageError`` and ``InputError`` are also ``ValueError``s, so library callers that catch
``ValueError`` for bad arguments keep working.
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class BnlabError(Exception):
    """An error bnlab explains in one paragraph (the message names the thing and the fix)."""

    exit_code = EXIT_FAILED


class UsageError(BnlabError, ValueError):
    """A bad flag, setting or argument."""

    exit_code = EXIT_USAGE


class InputError(BnlabError, ValueError):
    """A file or data set that cannot be used as it is (corrupt, wrong shape, tampered)."""

    exit_code = EXIT_USAGE


class OutputError(BnlabError):
    """bnlab cannot write where it was told to (disk full, read-only, a file in the way)."""

    exit_code = EXIT_USAGE


class MissingExtra(BnlabError, ImportError):
    """An optional framework (Chainer, TensorFlow, Ray, ...) is not installed."""

    exit_code = EXIT_USAGE


def quote_error(err: BaseException, limit: int = 200) -> str:
    """``Type: message`` of a framework's error, for quoting inside one of bnlab's
    paragraphs: an empty message gives the type alone; a multi-line one its non-blank lines
    joined with "; " (Chainer puts the useful "Expect: ..." on the third line); a long one is
    cut at a word with an ellipsis (never mid-sentence without saying)."""
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# Chainer 7.8.1 needs numpy<2 (and setuptools<70 at run time) while current JAX needs numpy>=2,
# so bnlab keeps Chainer in an environment of its own. Every "Chainer is missing" message
# (the engine, the doctor) ends with this one paragraph.
CHAINER_ENVIRONMENT = (
    "Chainer 7.8.1 needs numpy<2 and setuptools<70, so it lives in its own environment, not "
    "beside numpy 2 and JAX: from a clone of bnlab, `make venv-chainer` builds .venv-chainer "
    "(torch, Chainer, numpy<2), then run the same command with `.venv-chainer/bin/bnlab`. In an "
    'environment of your own: `pip install "numpy<2" "setuptools<70" wheel` then `pip install '
    "--no-build-isolation chainer==7.8.1` (DEVELOPERS.md)."
)


def chainer_missing_text(what: str, err: BaseException) -> str:
    """One paragraph: ``what`` needs Chainer, which ``err`` says cannot be imported here."""
    detail = str(err) or type(err).__name__
    return f"{what} needs Chainer 7.8.1, which is not importable here ({detail}). {CHAINER_ENVIRONMENT}"


class RunFailed(BnlabError):
    """A run, or some runs of a sweep, did not complete."""

    exit_code = EXIT_FAILED


class TrainingDiverged(BnlabError, RuntimeError):
    """The loss became NaN or infinite; the run directory keeps the epochs before it."""

    exit_code = EXIT_FAILED


def output_error(path: object, err: OSError, option: str = "--out") -> OutputError:
    """The one-paragraph message for an OSError met while writing ``path``; ``option`` is the
    flag that chose the place (``--out`` for train and compare, ``--fix`` for the doctor)."""
    import errno

    reason = {
        errno.ENOSPC: f"the disk is full; free some space or choose another {option}",
        errno.EROFS: f"the file system is read-only; choose another {option}",
        errno.EACCES: f"permission denied; choose a folder you can write to with {option}",
        errno.EEXIST: f"a file is in the way; choose another {option}",
        errno.ENOTDIR: f"a file stands where a folder is needed; choose another {option}",
        errno.EISDIR: f"a folder stands where a file is needed; choose another {option}",
    }.get(err.errno or 0, f"{err.strerror or err}; choose another {option}")
    return OutputError(f"cannot write {path}: {reason}.")
