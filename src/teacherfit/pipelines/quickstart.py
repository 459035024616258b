"""`teacherfit quickstart`: the embedded default, small, offline, on CPU, with packaged models.

1. rank: four real teachers (ChatGPT's own ShareGPT answers, SmolLM2-135M-Instruct, Qwen2.5-Coder-0.5B and
   -1.5B-Instruct) for the Gemma-3-270M base model on 20 real ShareGPT prompts, with a real local judge as
   reward. The response sets ship with the package, with full provenance; ``assets/quickstart/generate.yaml``
   regenerates them with ``teacherfit generate``.
2. distill: SmolLM2-135M-Instruct into a half-depth student built from its own layers, with logit and
   attention KD, a few minutes on CPU; loss curves in the distill report.
3. align (DAE): Qwen2.5-Coder-1.5B-Instruct as the Python-coding expert for a Qwen2.5-Coder-0.5B-Instruct
   student (LoRA), the student's starting weights as the general reference; HumanEval prompts are the domain,
   ShareGPT chat the rest; held-out domain and general losses before and after in the align report. The
   expert's top-k distributions ship as a `cache-teacher` cache (``dae/expert-cache``, pinned below), so the
   1.5B expert is never loaded: the whole quickstart stays within 10 minutes and 8 GB on a 2-core CPU.

It says which phase it is in and the time so far, and ends with what was learned (``summary.json`` holds the
same numbers, read from each phase's own results).
"""

from __future__ import annotations

import hashlib
from importlib.resources import files
from pathlib import Path
from typing import Any

from teacherfit.config import QuickstartConfig, prepare_run_dir
from teacherfit.models import release_memory
from teacherfit.pipelines.align import peak_rss_mb
from teacherfit.store import atomic_write_json
from teacherfit.ui import Stopwatch, console

ASSETS = Path(str(files("teacherfit").joinpath("assets/quickstart")))
EMBEDDED_CONFIG = ASSETS / "quickstart.yaml"
# The packaged expert cache, pinned: a damaged or edited file is refused, not trained on.
# (Regenerate with assets/quickstart/cache-teacher-dae.yaml, then update these.)
EXPERT_CACHE = ASSETS / "dae" / "expert-cache"
EXPERT_CACHE_SHA256 = {
    "index.json": "d4816a1463e0744b6ab1a4247226511fed7f262115af1a98e8f01c45c4985069",
    "shard-00000.safetensors": "10d81654d41f70138504237e027147cb5243b96d3ecb9222483162a4d801fbeb",
}


def verify_packaged_cache(folder: Path) -> None:
    """The packaged expert cache must be the pinned one (only when the config uses that folder)."""
    if Path(folder).resolve() != EXPERT_CACHE.resolve():
        return
    for name, want in EXPERT_CACHE_SHA256.items():
        path = EXPERT_CACHE / name
        got = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
        if got != want:
            raise ValueError(f"{path}: the packaged expert cache does not match its pinned sha256 ({got[:12]} != "
                             f"{want[:12]}): reinstall teacherfit, or regenerate it with cache-teacher-dae.yaml")


def _fmt_time(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def run_quickstart(cfg: QuickstartConfig) -> dict[str, Any]:
    from teacherfit.pipelines.align import run_align
    from teacherfit.pipelines.distill import run_distill
    from teacherfit.pipelines.rank import run_rank

    if cfg.align is not None and cfg.align.expert_cache is not None:
        verify_packaged_cache(cfg.align.expert_cache)
    run_dir = prepare_run_dir(cfg, "quickstart")
    clock = Stopwatch()
    phases = ["rank"] + [p for p in ("distill", "align") if getattr(cfg, p) is not None]
    what = {"rank": "which teacher fits the Gemma-3-270M base student (CAR)",
            "distill": "logit + attention KD of SmolLM2-135M into a half-depth copy",
            "align": "DAE: a coding expert's knowledge into Qwen2.5-Coder-0.5B, general chat kept"}

    def start(name: str) -> Stopwatch:
        release_memory()  # the previous phase's models: back to the system before the next ones load
        k = phases.index(name) + 1
        console.rule(f"[bold]quickstart phase {k}/{len(phases)}: {name}[/] ({_fmt_time(clock.seconds)} so far)")
        console.print(what[name])
        return Stopwatch()

    summary: dict[str, Any] = {"seconds": {}, "reports": {}, "peak_rss_mb": {}}
    lap = start("rank")
    rank = run_rank(cfg.rank.model_copy(update={"out": run_dir / "rank"}))
    summary["seconds"]["rank"] = round(lap.seconds, 1)
    summary["peak_rss_mb"]["rank"] = peak_rss_mb()  # VmHWM so far (align resets it for its own figure)
    pick = rank.results["recommendation"]
    summary["rank"] = {"ranking_by_car": [t["teacher"] for t in rank.teachers],
                       "car": {t["teacher"]: t["car"] for t in rank.teachers},
                       "pick": pick["teacher"], "supported": pick["supported"],
                       "p_beats_runner_up": pick["p_beats_runner_up"], "runner_up": pick["runner_up"],
                       "verdict": pick["text"]}
    summary["ranking_by_car"] = summary["rank"]["ranking_by_car"]
    summary["reports"]["rank"] = str(rank.run_dir / "report.html")
    if cfg.distill is not None:
        lap = start("distill")
        distilled = run_distill(cfg.distill.model_copy(update={"out": run_dir / "distill"}))
        summary["seconds"]["distill"] = round(lap.seconds, 1)
        summary["peak_rss_mb"]["distill"] = peak_rss_mb()
        summary["distill"] = {"model": distilled["model_dir"], "steps": distilled["steps"],
                              "kd_first": distilled["first"]["kd"], "kd_final": distilled["final"]["kd"],
                              "loss_first": distilled["first"]["loss"], "loss_final": distilled["final"]["loss"]}
        summary["reports"]["distill"] = str(run_dir / "distill" / "report.html")
    if cfg.align is not None:
        lap = start("align")
        aligned = run_align(cfg.align.model_copy(update={"out": run_dir / "align"}))
        summary["seconds"]["align"] = round(lap.seconds, 1)
        summary["peak_rss_mb"]["align"] = peak_rss_mb()
        summary["align"] = {"model": aligned["model_dir"], "routing": aligned["routing"]["counts"],
                            "heldout": {row["set"].split(" ")[0]: {"before": row["loss_before"],
                                                                   "after": row["loss_after"]}
                                        for row in aligned["heldout"]["table"]}}
        summary["reports"]["align"] = str(run_dir / "align" / "report.html")
    summary["seconds"]["total"] = round(clock.seconds, 1)
    peaks = [v for v in summary["peak_rss_mb"].values() if v is not None]
    summary["peak_rss_mb"]["total"] = max(peaks) if peaks else None
    atomic_write_json(run_dir / "summary.json", summary)
    print_summary(summary)
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    """What the three phases showed, in plain words, and where the reports are."""
    peak = summary["peak_rss_mb"].get("total")
    console.rule(f"[bold green]quickstart done[/] in {_fmt_time(summary['seconds']['total'])}"
                 + (f", peak memory {peak / 1024:.1f} GiB" if peak else ""))
    r = summary["rank"]
    console.print(f"[bold]1. teacher choice:[/] CAR ranks {', '.join(r['ranking_by_car'])}; "
                  f"{'pick' if r['supported'] else 'no pick'}: {r['verdict']}.")
    if "distill" in summary:
        d = summary["distill"]
        console.print(f"[bold]2. distillation:[/] KD loss {d['kd_first']:.3f} at step 1 -> {d['kd_final']:.3f} at step "
                      f"{d['steps']} (total loss {d['loss_first']:.3f} -> {d['loss_final']:.3f}).")
    if "align" in summary:
        h = summary["align"]["heldout"]
        parts = [f"{name} loss {v['before']:.3f} -> {v['after']:.3f}" for name, v in h.items()]
        said = []
        if "domain" in h:
            d = h["domain"]["after"] - h["domain"]["before"]
            said.append("closer to the expert on the domain" if d < 0 else "no closer to the expert on the domain "
                        "in so few steps")
        if "general" in h:
            g = h["general"]["after"] - h["general"]["before"]
            said.append(f"general chat {'kept' if abs(g) <= 0.05 else 'moved'} within {abs(g):.3f} nats of the start")
        console.print(f"[bold]3. DAE:[/] held-out {'; '.join(parts)} ({'; '.join(said)}).")
    console.print("reports:")
    for name, path in summary["reports"].items():
        console.print(f"  {name}: {path}", soft_wrap=True, highlight=False, markup=False)
