"""`teacherfit quickstart`: the embedded default, small, offline, on CPU, with packaged models.

1. rank: four real teachers (ChatGPT's own ShareGPT answers, SmolLM2-135M-Instruct, Qwen2.5-Coder-0.5B and
   -1.5B-Instruct) for the Gemma-3-270M base model on 20 real ShareGPT prompts, with a real local judge as
   reward. The response sets ship with the package, with full provenance; ``assets/quickstart/generate.yaml``
   regenerates them with ``teacherfit generate``.
2. distill: SmolLM2-135M-Instruct into a half-depth student built from its own layers, with logit and
   attention KD, a few minutes on CPU; loss curves in the distill report.
3. align (DAE): Qwen2.5-Coder-1.5B-Instruct as the Python-coding expert for a Qwen2.5-Coder-0.5B-Instruct
   student (LoRA), the student's starting weights as the general reference; HumanEval prompts are the domain,
   ShareGPT chat the rest; held-out domain and general losses before and after in the align report.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from teacherfit.config import QuickstartConfig, prepare_run_dir
from teacherfit.pipelines.align import run_align
from teacherfit.pipelines.distill import run_distill
from teacherfit.pipelines.rank import run_rank
from teacherfit.store import atomic_write_json
from teacherfit.ui import Stopwatch, console

ASSETS = Path(str(files("teacherfit").joinpath("assets/quickstart")))
EMBEDDED_CONFIG = ASSETS / "quickstart.yaml"


def run_quickstart(cfg: QuickstartConfig) -> dict[str, Any]:
    run_dir = prepare_run_dir(cfg, "quickstart")
    clock = Stopwatch()
    rank_cfg = cfg.rank.model_copy(update={"out": run_dir / "rank"})
    rank = run_rank(rank_cfg)
    summary: dict[str, Any] = {
        "seconds": {"rank": round(clock.seconds, 1)},
        "ranking_by_car": [t["teacher"] for t in rank.teachers],
        "report": str(rank.run_dir / "report.html"),
    }
    if cfg.distill is not None:
        lap = Stopwatch()
        distilled = run_distill(cfg.distill.model_copy(update={"out": run_dir / "distill"}))
        summary["seconds"]["distill"] = round(lap.seconds, 1)
        summary["distill"] = {"model": distilled["model_dir"], "first": distilled.get("first"),
                              "final": distilled["final"], "report": str(run_dir / "distill" / "report.html")}
    if cfg.align is not None:
        lap = Stopwatch()
        aligned = run_align(cfg.align.model_copy(update={"out": run_dir / "align"}))
        summary["seconds"]["align"] = round(lap.seconds, 1)
        summary["align"] = {"model": aligned["model_dir"], "heldout": aligned["heldout"]["table"],
                            "routing": aligned["routing"]["counts"], "final": aligned["final"],
                            "report": str(run_dir / "align" / "report.html")}
    atomic_write_json(run_dir / "summary.json", summary)
    reports = [summary["report"]] + [summary[k]["report"] for k in ("distill", "align") if k in summary]
    console.print(f"[bold green]quickstart done[/] in {clock.seconds:.0f} s; reports: {', '.join(reports)}")
    return summary
