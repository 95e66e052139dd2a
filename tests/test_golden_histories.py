"""No number moves: every preset on every engine, 3 epochs of seed 0, equals the history
pinned in tests/golden/histories_3_epochs.json float for float.

The pin was taken before the modules were reorganised; a refactor that changes any
arithmetic (an operation order, a dtype, a batch order) fails here. A change meant to move
numbers regenerates the file with tests/golden/make_histories.py and says why.
"""

import json

import pytest

from golden_runs import GOLDEN_FILE, golden_cases, run_case


def _engine_available(engine: str) -> bool:
    if engine != "chainer":
        return True
    try:
        import chainer  # noqa: F401
    except ImportError:
        return False
    return True


PINNED = json.loads(GOLDEN_FILE.read_text())


@pytest.mark.slow
@pytest.mark.parametrize(("engine", "preset"), golden_cases())
def test_history_is_pinned(engine, preset, mnist):
    if not _engine_available(engine):
        pytest.skip(f"{engine} is not installed")
    assert run_case(engine, preset, mnist) == PINNED[f"{engine}/{preset}"]


def test_every_case_is_pinned():
    assert sorted(PINNED) == sorted(f"{e}/{p}" for e, p in golden_cases())
