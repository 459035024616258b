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
from teacherfit.config import CorrelateConfig, prepare_run_dir
from teacherfit.store import atomic_write_json
from teacherfit.ui import console, rich_table

CORRELATED = ["car", "reward", "length", "loss_student", "ppl_student", "ifd_student", "ppl_ref", "ifd_ref"]


def read_outcomes(path: Path) -> dict[str, float]:
    """teacher -> outcome, from JSON/YAML ({teacher: value} or [{teacher, outcome}]) or CSV (teacher,outcome)."""
    path = Path(path)
    if path.suffix == ".csv":
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or not {"teacher", "outcome"} <= set(rows[0]):
            raise ValueError(f"{path}: a CSV of outcomes needs the columns teacher,outcome")
        return {r["teacher"]: float(r["outcome"]) for r in rows}
    data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    if isinstance(data, dict) and "outcomes" in data:
        data = data["outcomes"]
    if isinstance(data, list):
        return {str(r["teacher"]): float(r["outcome"]) for r in data}
    if isinstance(data, dict):
        return {str(k): float(v) for k, v in data.items()}
    raise ValueError(f"{path}: outcomes must map teacher -> number")


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
    corr = metrics.correlate_metrics(oriented, y, n_resamples=n_boot, seed=seed)
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
    run_dir = prepare_run_dir(cfg, "correlate")
    rank_results = json.loads((Path(cfg.rank_run) / "results.json").read_text())
    outcomes = read_outcomes(cfg.outcomes)
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
