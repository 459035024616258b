"""`teacherfit correlate`: the outcomes file in every accepted format, and one clear line for every bad one."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from teacherfit import metrics
from teacherfit.cli import app
from teacherfit.config import ConfigError, CorrelateConfig
from teacherfit.data import DataError
from teacherfit.pipelines.correlate import run_correlate

runner = CliRunner()

# what `teacherfit rank` writes per teacher (best CAR first), for four teachers
TEACHERS = [
    {"teacher": "a", "car": 4.0, "reward": 8.0, "length": 120.0, "loss_student": 1.0},
    {"teacher": "b", "car": 3.0, "reward": 7.0, "length": 300.0, "loss_student": 1.3},
    {"teacher": "c", "car": 2.0, "reward": 6.5, "length": 80.0, "loss_student": 2.2},
    {"teacher": "d", "car": 1.0, "reward": 5.0, "length": 200.0, "loss_student": 2.0},
]
OUTCOMES = {"a": 0.5, "b": 0.25, "c": 0.125, "d": 0.1}


@pytest.fixture
def rank_run(tmp_path):
    run = tmp_path / "rank"
    run.mkdir()
    (run / "teachers.json").write_text(json.dumps(TEACHERS))
    (run / "results.json").write_text(json.dumps({"beta": 0.5, "car_variant": "plain", "teachers": TEACHERS}))
    return run


def correlate_cfg(rank_run, outcomes, tmp_path) -> CorrelateConfig:
    return CorrelateConfig(rank_run=rank_run, outcomes=outcomes, bootstrap=0, out=tmp_path / "corr")


@pytest.mark.parametrize("name, text", [
    ("o.json", json.dumps(OUTCOMES)),
    ("o.json", '{\n\t"a": 5e-1,\n\t"b": 0.25,\n\t"c": 0.125,\n\t"d": 1E-1\n}'),  # tabs, exponents: JSON, not YAML 1.1
    ("o.json", json.dumps([{"teacher": k, "outcome": v} for k, v in OUTCOMES.items()])),
    ("o.yaml", "outcomes:\n  a: 0.5\n  b: 0.25\n  c: 0.125\n  d: 0.1\n"),
    ("o.yml", "- {teacher: a, outcome: 0.5}\n- {teacher: b, outcome: 0.25}\n- {teacher: c, outcome: 0.125}\n"
              "- {teacher: d, outcome: 0.1}\n"),
    ("o.csv", "teacher,outcome\na,0.5\nb,0.25\nc,0.125\nd,0.1\n"),
    ("o.csv", "\ufeffteacher,outcome\r\na,0.5\r\nb,0.25\r\nc,0.125\r\nd,0.1\r\n"),  # Excel's "CSV UTF-8": a BOM
])  # fmt: skip
def test_outcomes_in_every_format_give_the_same_correlations(rank_run, tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    result = run_correlate(correlate_cfg(rank_run, path, tmp_path))
    assert dict(zip(result["teachers"], result["outcomes"])) == OUTCOMES
    rows = {r["metric"]: r for r in result["correlations"]}
    y = [OUTCOMES[t["teacher"]] for t in TEACHERS]
    assert rows["car"]["spearman"] == pytest.approx(1.0)  # CAR ranked the teachers as the outcome did
    assert rows["length"]["spearman"] == pytest.approx(metrics.spearman([t["length"] for t in TEACHERS], y))
    assert math.isnan(rows["car"]["spearman_low"])  # bootstrap: 0 means no interval, not a crash


BAD_OUTCOMES = [
    # name, text, line named (None: the file has none), what the message says
    ("o.json", '{"a": 0.5,\n "b": "high"}', 2, "the outcome of teacher 'b' must be a finite number, got 'high'"),
    ("o.json", '{"a": 0.5,\n "b": {"ap": 0.2}}', 2, "teacher 'b' must be a finite number, got a nested value"),
    ("o.yaml", "a: 0.5\nb: [0.2, 0.3]\n", 2, "teacher 'b' must be a finite number, got a nested value"),
    ("o.json", '{"a": true}', 1, "teacher 'a' must be a finite number, got True"),
    ("o.csv", "teacher,outcome\na,0.5\nb,nan\n", 3, "teacher 'b' must be a finite number, got 'nan'"),
    ("o.csv", "teacher,outcome\na,0.5\nb\n", 3, "teacher 'b' must be a finite number, got nothing"),
    ("o.csv", "name,outcome\na,0.5\n", 1, "needs the header teacher,outcome (found: name,outcome)"),
    ("o.json", '[{"teacher": "a", "outcome": 0.5},\n {"model": "b", "outcome": 0.2}]', 2,
     "each entry needs the fields teacher and outcome"),
    ("o.csv", "teacher,outcome\na,0.5\nb,0.2\na,0.4\n", 4, "teacher 'a' already has an outcome on line 2"),
    ("o.yaml", "a: 0.5\nb: 0.2\na: 0.4\n", 3, "teacher 'a' already has an outcome on line 1"),
    ("o.json", '{"a": 0.5,\n "b": 0.2,\n "a": 0.4}', 3, "teacher 'a' already has an outcome on line 1"),
    ("o.json", '{"a": 0.5,\n "b": }', 2, "not valid JSON"),
    ("o.yaml", "a: 0.5\n  b: 0.2\n", 2, "not valid YAML"),
    ("o.yaml", "", None, "no outcomes"),
    ("o.txt", "a: 0.5\n", None, "name the outcomes file .json, .yaml, .yml or .csv"),
]


@pytest.mark.parametrize("name, text, line, says", BAD_OUTCOMES)
def test_bad_outcomes_file_is_one_line_naming_file_and_line(rank_run, tmp_path, name, text, line, says):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as err:
        run_correlate(correlate_cfg(rank_run, path, tmp_path))
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: " if line else f"{path}: ") and says in message
    assert "\n" not in message and err.value.line == line
    assert not (tmp_path / "corr").exists()  # refused before the run directory is made


def test_a_folder_or_a_missing_file_as_outcomes(rank_run, tmp_path):
    for path, says in ((tmp_path, "is a folder"), (tmp_path / "nope.json", "no such file")):
        with pytest.raises(DataError, match=says) as err:
            run_correlate(correlate_cfg(rank_run, path, tmp_path))
        assert str(err.value).startswith(f"{path}: ")


def test_a_folder_that_is_not_a_rank_run(tmp_path):
    outcomes = tmp_path / "o.json"
    outcomes.write_text(json.dumps(OUTCOMES))
    (tmp_path / "gen").mkdir()
    with pytest.raises(ConfigError, match=r"rank_run: .*gen is not a finished `teacherfit rank` run \(no teachers.json"):
        run_correlate(correlate_cfg(tmp_path / "gen", outcomes, tmp_path))


def cli_error(*args) -> str:
    result = runner.invoke(app, ["correlate", *map(str, args)])  # --out given: nothing is written under the cwd
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert "Traceback" not in result.output
    assert [line.startswith("error:") for line in result.output.splitlines()].count(True) == 1
    return result.output.replace("\n", "")  # rich folds long lines at the terminal width


def test_cli_reports_bad_outcomes_in_one_line(rank_run, tmp_path):
    out = ("--out", tmp_path / "corr")
    assert f"{tmp_path}: is a folder" in cli_error("--rank-run", rank_run, "--outcomes", tmp_path, *out)
    dup = tmp_path / "outcomes.csv"
    dup.write_text("\ufeffteacher,outcome\na,0.5\nb,0.2\nc,0.1\na,0.4\n")
    assert f"{dup}:5: teacher 'a' already has an outcome on line 2" in cli_error(
        "--rank-run", rank_run, "--outcomes", dup, *out)
    bad = tmp_path / "outcomes.yaml"
    bad.write_text("a: 0.5\nb: high\n")
    assert f"{bad}:2: the outcome of teacher 'b' must be a finite number" in cli_error(
        "--rank-run", rank_run, "--outcomes", bad, *out)


def test_cli_reports_a_folder_that_is_not_a_rank_run(tmp_path):
    outcomes = tmp_path / "o.json"
    outcomes.write_text(json.dumps(OUTCOMES))
    assert "is not a finished `teacherfit rank` run (no teachers.json" in cli_error(
        "--rank-run", tmp_path, "--outcomes", outcomes, "--out", tmp_path / "corr")


@pytest.mark.parametrize("name, text", [
    ("deep.json", "[" * 100_000 + "]" * 100_000),
    ("deep.yaml", "a: " + "[" * 100_000 + "]" * 100_000 + "\n"),
])
def test_an_outcomes_file_nested_too_deeply_is_one_line(rank_run, tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert "nested too deeply" in cli_error("--rank-run", rank_run, "--outcomes", path, "--out", tmp_path / "corr")
