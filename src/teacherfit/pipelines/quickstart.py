"""`teacherfit quickstart`: the embedded default, small, offline, on CPU, with packaged models.

Ranks four real teachers (ChatGPT's own ShareGPT answers, SmolLM2-135M-Instruct, Qwen2.5-Coder-0.5B and
-1.5B-Instruct) for the Gemma-3-270M base model on 20 real ShareGPT prompts, with a real local judge as
reward. The response sets ship with the package, with full provenance; ``assets/quickstart/generate.yaml``
regenerates them with ``teacherfit generate``.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from teacherfit.config import QuickstartConfig, prepare_run_dir
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
    summary = {
        "seconds": {"rank": round(clock.seconds, 1)},
        "ranking_by_car": [t["teacher"] for t in rank.teachers],
        "report": str(rank.run_dir / "report.html"),
    }
    atomic_write_json(run_dir / "summary.json", summary)
    console.print(f"[bold green]quickstart done[/] in {clock.seconds:.0f} s; report: {summary['report']}")
    return summary
