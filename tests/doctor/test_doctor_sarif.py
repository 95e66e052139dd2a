"""``--format sarif`` (validated against the SARIF 2.1.0 schema), ``--fail-on``, and the
pre-commit hook run by the real ``pre-commit`` tool in a throwaway git repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bnlab.doctor import registry
from bnlab.doctor.command import main
from bnlab.doctor.findings import Finding, Report

REPO = Path(__file__).resolve().parents[2]
SCHEMA = Path(__file__).resolve().parent / "data" / "sarif-schema-2.1.0.json"

QUESTION = """\
    from torch import nn


    class MyModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = nn.Linear(20, 16)
            self.l2 = nn.Linear(16, 16)
            self.l3 = nn.Linear(16, 4)
            self.bn = nn.BatchNorm1d(16)  # the shared BN

        def forward(self, x):
            h = self.bn(self.l1(x)).relu()  # call 1
            h = self.bn(self.l2(h)).relu()  # call 2
            return self.l3(h)
    """

# Only a warning (a Keras-style momentum in PyTorch) and an info (untrained statistics).
WARNING_ONLY = """\
    from torch import nn


    class WarnModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = nn.Linear(20, 16, bias=False)
            self.bn = nn.BatchNorm1d(16, momentum=0.9)
            self.l2 = nn.Linear(16, 4)

        def forward(self, x):
            return self.l2(self.bn(self.l1(x)).relu())
    """

HEALTHY = """\
    from torch import nn


    class Healthy(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = nn.Linear(20, 4)

        def forward(self, x):
            return self.l1(x)
    """


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.fixture
def models(tmp_path: Path, monkeypatch) -> Path:
    """The model files, in the working directory (SARIF paths are relative to it)."""
    for name, source in (("question.py", QUESTION), ("warn.py", WARNING_ONLY), ("healthy.py", HEALTHY)):
        (tmp_path / name).write_text(textwrap.dedent(source))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def sarif_of(argv: list[str], capsys) -> tuple[int, dict]:
    status = main([*argv, "--format", "sarif"])
    return status, json.loads(capsys.readouterr().out)


def validate(log: dict) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(log, schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)


def test_question_sarif_validates_and_shared_bn_has_both_call_lines(models: Path, capsys) -> None:
    status, log = sarif_of(["question.py:MyModel", "--input-shape", "64,20"], capsys)
    assert status == 1
    validate(log)
    (run,) = log["runs"]
    rules = run["tool"]["driver"]["rules"]
    assert [rule["id"] for rule in rules] == registry.check_ids()  # one rule per check
    for rule in rules:
        spec = registry.get(rule["id"])
        assert rule["shortDescription"]["text"] == spec.summary
        assert rule["help"]["text"]
    (result,) = [r for r in run["results"] if r["ruleId"] == "shared-bn"]
    assert result["level"] == "error"
    assert rules[result["ruleIndex"]]["id"] == "shared-bn"
    lines = [loc["physicalLocation"]["region"]["startLine"] for loc in result["locations"]]
    uris = {loc["physicalLocation"]["artifactLocation"]["uri"] for loc in result["locations"]}
    assert lines == [line_of(models / "question.py", "# call 1"), line_of(models / "question.py", "# call 2")]
    assert uris == {"question.py"}
    (related,) = result["relatedLocations"]
    assert related["physicalLocation"]["region"]["startLine"] == line_of(models / "question.py", "# the shared BN")
    assert run["originalUriBaseIds"]["%SRCROOT%"]["uri"] == models.resolve().as_uri() + "/"


def test_info_is_a_note_and_findings_without_lines_point_at_the_file(models: Path, capsys) -> None:
    status, log = sarif_of(["warn.py:WarnModel", "--input-shape", "64,20"], capsys)
    assert status == 0
    validate(log)
    levels = {r["ruleId"]: r["level"] for r in log["runs"][0]["results"]}
    assert levels == {"momentum-convention": "warning", "untrained-stats": "note"}
    # A report finding with no line at all: the model file, without a region.
    from bnlab.doctor.sarif import to_sarif

    report = Report([Finding("non-finite", "error", "NaN in the output", "model output")])
    log = to_sarif(report, target_file="warn.py")
    validate(log)
    (location,) = log["runs"][0]["results"][0]["locations"]
    assert location["physicalLocation"] == {"artifactLocation": {"uri": "warn.py", "uriBaseId": "%SRCROOT%"}}


# -- --fail-on ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "fail_on", "status"),
    [
        ("warn.py:WarnModel", "error", 0),  # the default: today's behaviour
        ("warn.py:WarnModel", "warning", 1),
        ("warn.py:WarnModel", "info", 1),
        ("warn.py:WarnModel", "never", 0),
        ("question.py:MyModel", "never", 0),
        ("question.py:MyModel", "error", 1),
        ("healthy.py:Healthy", "info", 0),
    ],
)
def test_fail_on(models: Path, target: str, fail_on: str, status: int, capsys) -> None:
    assert main([target, "--input-shape", "64,20", "--fail-on", fail_on]) == status
    assert f"-> exit {status}" in capsys.readouterr().out
    assert main([target, "--input-shape", "64,20", "--fail-on", fail_on, "--json"]) == status
    data = json.loads(capsys.readouterr().out)
    assert (data["exit_code"], data["fail_on"]) == (status, fail_on)


def test_report_exit_status() -> None:
    warning = Finding("momentum-convention", "warning", "t", "bn")
    info = Finding("bias-before-bn", "info", "t", "l1")
    report = Report([warning, info])
    assert [report.exit_status(level) for level in ("error", "warning", "info", "never")] == [0, 1, 1, 0]
    assert Report([info]).exit_status("warning") == 0
    assert Report([warning], fail_on="warning").exit_code == 1
    with pytest.raises(ValueError, match="fail_on"):
        Report([], fail_on="sometimes")  # type: ignore[arg-type]


def test_json_and_another_format_is_a_usage_error(models: Path, capsys) -> None:
    assert main(["warn.py:WarnModel", "--input-shape", "64,20", "--json", "--format", "sarif"]) == 2
    assert "--json means --format json" in capsys.readouterr().err
    assert main(["warn.py:WarnModel", "--input-shape", "64,20", "--fail-on", "sometimes"]) == 2


# -- the pre-commit hook ----------------------------------------------------------------


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "commit.gpgsign=false", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


def _pre_commit(repo: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PRE_COMMIT_HOME": str(home),  # its cache: not the user's
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "pre_commit", "run", "--all-files", "--color", "never"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.skipif(shutil.which("git") is None, reason="pre-commit needs git")
def test_pre_commit_hook_from_this_repository(tmp_path: Path) -> None:
    """The hook as users reference it (``repo:`` this repository's .pre-commit-hooks.yaml,
    here a local clone: offline), with the doctor's arguments in ``args``."""
    pytest.importorskip("pre_commit")
    if shutil.which("bnlab", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("the bnlab command is not installed beside this Python")
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    shutil.copy(REPO / ".pre-commit-hooks.yaml", hooks)
    _git(hooks, "init", "-q")
    _git(hooks, "add", ".")
    _git(hooks, "commit", "-q", "-m", "hooks")
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=hooks, capture_output=True, text=True).stdout.strip()
    project = tmp_path / "project"
    project.mkdir()
    (project / "model.py").write_text(textwrap.dedent(QUESTION))
    config = {
        "repos": [
            {
                "repo": str(hooks),
                "rev": rev,
                "hooks": [{"id": "bnlab-doctor", "args": ["model.py:MyModel", "--input-shape", "64,20"]}],
            }
        ]
    }
    (project / ".pre-commit-config.yaml").write_text(json.dumps(config))  # JSON is YAML
    _git(project, "init", "-q")
    _git(project, "add", ".")
    done = _pre_commit(project, tmp_path / "cache")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "[shared-bn]" in done.stdout
    assert f"model.py:{line_of(project / 'model.py', '# call 2')}: call 2 after l2" in done.stdout
    # Mended (one BN per call site): the hook passes.
    fixed = textwrap.dedent(QUESTION).replace("self.bn(self.l2(h))", "self.bn2(self.l2(h))")
    fixed = fixed.replace(
        "        self.bn = nn.BatchNorm1d(16)",
        "        self.bn = nn.BatchNorm1d(16)\n        self.bn2 = nn.BatchNorm1d(16)",
    )
    (project / "model.py").write_text(fixed)
    _git(project, "add", ".")
    done = _pre_commit(project, tmp_path / "cache")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Passed" in done.stdout
