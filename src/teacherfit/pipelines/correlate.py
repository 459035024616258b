"""`teacherfit correlate`: how well each metric of a rank run predicted the observed outcome per teacher.

The outcome is whatever the user measured after fine-tuning the student on each teacher (the paper's AP:
mean of AlpacaEval 2 LC win rate and Arena-Hard), one number per teacher. Each metric is oriented so that
"better" is higher (``metrics.METRIC_DIRECTION``) before correlating, so a positive rho always means the
metric ranked the teachers the way the outcome did. beta is calibrated by leave-one-out.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import yaml

from teacherfit import metrics
from teacherfit.config import ConfigError, CorrelateConfig, prepare_run_dir
from teacherfit.data import DataError
from teacherfit.store import atomic_write_json
from teacherfit.ui import console, rich_table

CORRELATED = ["car", "reward", "length", "loss_student", "ppl_student", "ifd_student", "ppl_ref", "ifd_ref",
              "grape", "grace", "reward_2", "car_2"]


OUTCOMES_FORMAT = ("a JSON/YAML mapping {teacher: number}, a list of {teacher, outcome}, or a CSV with columns "
                   "teacher,outcome")


def _csv_entries(path: Path) -> list[tuple[Any, Any, int]]:
    """(teacher, outcome, line) per row; utf-8-sig so that Excel's byte-order mark is not read as a column name."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"teacher", "outcome"} <= {f.strip() for f in reader.fieldnames}:
            raise DataError(f"{path}:1: a CSV of outcomes needs the header teacher,outcome (found: "
                            f"{','.join(reader.fieldnames or [])})", path, line=1)
        rows = []
        for row in reader:
            row = {(k or "").strip(): v for k, v in row.items()}
            rows.append((row.get("teacher"), row.get("outcome"), reader.line_num))
        return rows


def _tree_entries(path: Path, text: str) -> list[tuple[Any, Any, int]]:
    """(teacher, outcome, line) per entry of a JSON or YAML file, duplicates kept (a plain load drops them).

    Walks YAML's node tree, which has line numbers; JSON is read through it too (a valid JSON text is YAML
    flow syntax once its tabs, which can only be whitespace there, are spaces), its scalars by ``json``.
    """
    is_json = path.suffix == ".json"
    if is_json:
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})", path, line=err.lineno) from None
        except RecursionError:
            raise DataError(f"{path}: nested too deeply to be an outcomes file", path) from None
        text = text.replace("\t", " ")
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        root = loader.get_single_node()

        def value(node: yaml.Node) -> Any:
            if not isinstance(node, yaml.ScalarNode):
                return node  # nested: refused below
            return json.loads(text[node.start_mark.index:node.end_mark.index]) if is_json else loader.construct_object(node)

        line = lambda node: node.start_mark.line + 1  # noqa: E731
        if isinstance(root, yaml.MappingNode):
            inner = [v for k, v in root.value if value(k) == "outcomes"]
            root = inner[0] if inner else root
        if isinstance(root, yaml.MappingNode):
            return [(value(k), value(v), line(k)) for k, v in root.value]
        if isinstance(root, yaml.SequenceNode):
            entries = []
            for item in root.value:
                fields = {value(k): v for k, v in item.value} if isinstance(item, yaml.MappingNode) else {}
                if "teacher" not in fields or "outcome" not in fields:
                    raise DataError(f"{path}:{line(item)}: each entry needs the fields teacher and outcome", path,
                                    line=line(item))
                entries.append((value(fields["teacher"]), value(fields["outcome"]), line(item)))
            return entries
    except RecursionError:
        raise DataError(f"{path}: nested too deeply to be an outcomes file; give {OUTCOMES_FORMAT}", path) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        number = mark.line + 1 if mark is not None else None
        raise DataError(f"{path}{f':{number}' if number else ''}: not valid {'JSON' if is_json else 'YAML'} "
                        f"({getattr(err, 'problem', None) or err})", path, line=number) from None
    finally:
        if loader is not None:
            loader.dispose()
    raise DataError(f"{path}: no outcomes; give {OUTCOMES_FORMAT}", path)


def read_outcomes(path: Path) -> dict[str, float]:
    """teacher -> outcome, from JSON/YAML ({teacher: value}, [{teacher, outcome}], either under ``outcomes:``)
    or CSV (teacher,outcome). Anything else, a teacher given twice, or a value that is not a finite number is a
    DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {'is a folder' if path.is_dir() else 'no such file'}; give the outcomes file: "
                        f"{OUTCOMES_FORMAT}", path)
    if path.suffix not in (".csv", ".json", ".yaml", ".yml"):
        raise DataError(f"{path}: name the outcomes file .json, .yaml, .yml or .csv ({OUTCOMES_FORMAT})", path)
    try:
        entries = _csv_entries(path) if path.suffix == ".csv" else _tree_entries(path, path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save it as UTF-8 (CSV UTF-8 in Excel)", path) from None
    except csv.Error as err:
        raise DataError(f"{path}: not a readable CSV ({err})", path) from None
    outcomes: dict[str, float] = {}
    lines: dict[str, int] = {}
    for teacher, outcome, line in entries:
        where = f"{path}:{line}"
        if not isinstance(teacher, (str, int, float)) or isinstance(teacher, bool) or not str(teacher).strip():
            raise DataError(f"{where}: no teacher name; give each outcome its teacher's name from the rank run", path,
                            line=line)
        teacher = str(teacher).strip()
        if teacher in lines:
            raise DataError(f"{where}: teacher {teacher!r} already has an outcome on line {lines[teacher]}; keep one "
                            "row per teacher", path, line=line)
        try:
            number = float(outcome.strip() if isinstance(outcome, str) else outcome)
            if isinstance(outcome, bool) or not math.isfinite(number):
                raise ValueError
        except (TypeError, ValueError):
            shown = ("a nested value" if isinstance(outcome, yaml.Node) else "nothing" if outcome in (None, "")
                     else repr(outcome))
            raise DataError(f"{where}: the outcome of teacher {teacher!r} must be a finite number, got {shown}", path,
                            line=line) from None
        outcomes[teacher], lines[teacher] = number, line
    if not outcomes:
        raise DataError(f"{path}: no outcomes; give {OUTCOMES_FORMAT}", path)
    return outcomes


def read_rank_run(rank_run: Path) -> dict[str, Any]:
    """The results of a finished ``teacherfit rank`` run directory."""
    rank_run, results = Path(rank_run), Path(rank_run) / "results.json"
    missing = [name for name in ("teachers.json", "results.json") if not (rank_run / name).is_file()]
    if missing:
        raise ConfigError(f"rank_run: {rank_run} is not a finished `teacherfit rank` run (no {' or '.join(missing)}); "
                          "give the --out folder of a finished `teacherfit rank`")
    try:
        data = json.loads(results.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{results}: not readable JSON ({err}); run `teacherfit rank` again with this --out",
                        results) from None
    if not isinstance(data, dict) or not isinstance(data.get("teachers"), list):
        raise DataError(f"{results}: has no list of teachers; run `teacherfit rank` again with this --out", results)
    return data


def correlate(teachers: list[dict[str, Any]], outcomes: dict[str, float], *, n_boot: int = 1000, seed: int = 0,
              beta_source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Correlations of every metric with the outcome over the teachers present in both."""
    rows = [t for t in teachers if t["teacher"] in outcomes]
    missing = sorted(set(outcomes) ^ {t["teacher"] for t in teachers})
    if len(rows) < 3:
        raise ValueError(f"need outcomes for at least 3 ranked teachers, got {len(rows)} (unmatched: {missing})")
    y = [outcomes[t["teacher"]] for t in rows]
    oriented = {}
    for m in CORRELATED:
        values = [t.get(m, math.nan) for t in rows]
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            oriented[m] = [metrics.METRIC_DIRECTION.get(m, 1) * v for v in values]
    corr = metrics.correlate_metrics(oriented, y, n_resamples=max(n_boot, 1), seed=seed)
    if not n_boot:  # bootstrap: 0 asks for no interval (correlate_metrics needs at least one resample)
        corr = [row | {"spearman_low": math.nan, "spearman_high": math.nan} for row in corr]
    result: dict[str, Any] = {"n_teachers": len(rows), "unmatched": missing, "correlations": corr,
                              "teachers": [t["teacher"] for t in rows], "outcomes": y,
                              "paper_table4": metrics.PAPER_TABLE4}
    rewards = [t["reward"] for t in rows]
    losses = [t["loss_student"] for t in rows]
    loo = metrics.loo_calibrated_car(rewards, losses, y)
    result["beta_calibration"] = {k: (v if isinstance(v, str) else float(v) if isinstance(v, (int, float))
                                      else [float(x) for x in v]) for k, v in loo.items()}
    if beta_source:
        result["beta_used_in_rank"] = beta_source.get("beta")
    return result


def run_correlate(cfg: CorrelateConfig) -> dict[str, Any]:
    rank_results = read_rank_run(cfg.rank_run)
    outcomes = read_outcomes(cfg.outcomes)
    run_dir = prepare_run_dir(cfg, "correlate")
    result = correlate(rank_results["teachers"], outcomes, n_boot=cfg.bootstrap, seed=cfg.seed,
                       beta_source=rank_results)
    result["outcome_source"] = str(cfg.outcomes)
    atomic_write_json(run_dir / "correlations.json", result)
    from teacherfit.pipelines.reports import correlate_report

    correlate_report(result).write(run_dir / "report.html")
    console.print(rich_table(result["correlations"], ["metric", "spearman", "spearman_low", "spearman_high", "kendall"],
                             title=f"correlation with outcome over {result['n_teachers']} teachers"))
    cal = result["beta_calibration"]
    console.print(f"beta calibrated on all teachers: {cal['beta_full']:.3g}; leave-one-out CAR rho: {cal['corr_loo']:.3f}")
    console.print(f"results: {run_dir}")
    result["run_dir"] = str(run_dir)
    return result
