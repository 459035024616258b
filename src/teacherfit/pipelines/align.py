"""`teacherfit align`: Domain Alignment from Expert (DAE, docs/papers.md section 2.4).

Three models: the student being trained, a frozen domain expert and a frozen general reference model, all
sharing the student's tokenizer. Each training sample is routed (``teacherfit.routing``): domain samples
take the expert's next-token distribution as target, the others the reference model's, and

    L_DAE = (1 - lambda) * CE + lambda * tau^2 * mean over response tokens of KL(p* || p_S)

computed by the distillation runtime (``distill.train`` with a ``RoutedTeacher``: one loop, one loss).

The sequence: training data -> routing (and the domain share, by resampling) -> tokenizer checks of both
teachers or caches against the student (before any model weights are read) -> held-out losses of the
untrained student -> training -> held-out losses of the trained student -> results.json, report.html.
With ``dry_run`` it stops after routing: counts, share and the borderline samples, nothing loaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from teacherfit.config import AlignConfig, EvaluateConfig, prepare_run_dir
from teacherfit.data import Record, load_records, tokenize_example
from teacherfit.distill.examples import example_key, training_records
from teacherfit.launch import is_main_process
from teacherfit.models import load_model, release_memory
from teacherfit.pipelines.recipe import STUDENT_ITSELF, TeacherSource, model_card_info, prepare, train_job
from teacherfit.routing import DOMAIN, GENERAL, Routing, resample_to_share, route, sample_text, share_of
from teacherfit.store import atomic_write_json, atomic_write_text, cached_json
from teacherfit.ui import console, rich_table

ROUTE_TEACHER = {DOMAIN: "expert", GENERAL: "reference"}


# ---------------------------------------------------------------- memory


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (VmHWM) in MiB, Linux only."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs), so a phase's peak can be read."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- routing


def _teacher_sources(cfg: AlignConfig) -> dict[str, TeacherSource]:
    """Per route: the model, its cache, or the student's starting weights; refuses none or both."""
    out = {}
    for name, (model, cache) in {DOMAIN: (cfg.expert, cfg.expert_cache),
                                 GENERAL: (cfg.reference, cfg.reference_cache)}.items():
        who = ROUTE_TEACHER[name]
        if model and cache:
            raise ValueError(f"give either {who} (online) or {who}_cache (offline), not both")
        if not (model or cache):
            raise ValueError(f"align needs the {who} model: give `{who}` or `{who}_cache` "
                             "(or kd.lambda=0 to train on the responses alone)")
        if model == STUDENT_ITSELF:
            if name != GENERAL:
                raise ValueError(f"`expert: {STUDENT_ITSELF}` makes no sense: the expert brings the domain knowledge")
            # a LoRA student with adapters off is its starting weights (no copy); otherwise load a frozen copy
            out[name] = (TeacherSource(name, who, "self", None) if cfg.lora is not None
                         else TeacherSource(name, who, "model", cfg.student))
        else:
            out[name] = TeacherSource(name, who, "model", model) if model else TeacherSource(name, who, "cache", cache)
    return out


def routing_rows(records: list[Record], routing: Routing, text: str) -> list[dict]:
    return [{"id": r.id, "key": example_key(r), "route": DOMAIN if d else GENERAL, "probability": p,
             "reason": why, "text": sample_text(r, text)[:300]}
            for r, d, p, why in zip(records, routing.domain, routing.probability, routing.reason)]


def routing_summary(cfg: AlignConfig, records: list[Record], routing: Routing, mix: list[int]) -> dict[str, Any]:
    rows = routing_rows(records, routing, cfg.routing.text)
    mixed = [routing.domain[i] for i in mix]
    summary: dict[str, Any] = {
        "source": routing.source,
        "counts": routing.counts(),
        "share_before": share_of(routing.domain),
        "share_after": share_of(mixed),
        "domain_share": cfg.domain_share,
        "mix": {"samples": len(mix), DOMAIN: sum(mixed), GENERAL: len(mixed) - sum(mixed),
                "distinct": len(set(mix)),
                "sampling": "as routed" if cfg.domain_share is None else
                "per route: subsampled without replacement, or repeated whole then topped up without replacement "
                f"(seed {cfg.train.seed})"},
        "threshold": routing.threshold,
        "info": routing.info,
        "borderline": [rows[i] for i in routing.borderline(cfg.routing.borderline)],
    }
    flags = [r.meta.get(cfg.routing.field) for r in records]
    if routing.source != "flag" and all(isinstance(f, bool) for f in flags):
        agree = sum(f == d for f, d in zip(flags, routing.domain))
        summary["agreement_with_flag"] = {"field": cfg.routing.field, "agree": agree, "n": len(flags)}
    return summary


def print_routing(summary: dict[str, Any]) -> None:
    c = summary["counts"]
    console.print(f"routing ({summary['source']}): {c[DOMAIN]} domain -> expert, {c[GENERAL]} general -> reference; "
                  f"domain share {summary['share_before']:.3f}"
                  + (f" -> {summary['share_after']:.3f} after resampling ({summary['mix']['samples']} samples)"
                     if summary["domain_share"] is not None else ""))
    if "agreement_with_flag" in summary:
        a = summary["agreement_with_flag"]
        console.print(f"agreement with the {a['field']!r} flag of the data: {a['agree']}/{a['n']}")
    if summary["borderline"]:
        console.print(rich_table([{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in row.items()
                                   if k in ("id", "route", "probability", "text")} | {"text": row["text"][:80]}
                                  for row in summary["borderline"]],
                                 ["id", "route", "probability", "text"],
                                 title=f"borderline samples (P(domain) closest to {summary['threshold']})",
                                 compact=True))


# ---------------------------------------------------------------- held-out losses


def heldout_losses(model_spec: str | Path, sets: dict[str, Path], cfg: AlignConfig) -> dict[str, dict]:
    """Mean token NLL of each held-out set's responses under ``model_spec`` (one model load)."""
    from teacherfit.scoring import score_examples

    if not sets:
        return {}
    loaded = load_model(str(model_spec), device=cfg.models.device, dtype=cfg.models.dtype,
                        trust_remote_code=cfg.models.trust_remote_code)
    out = {}
    for name, path in sets.items():
        records = load_records(path, require_response=True).records
        records = records[: cfg.heldout.limit] if cfg.heldout.limit else records
        examples = [tokenize_example(loaded.tokenizer, r.messages, max_length=cfg.train.max_length) for r in records]
        scored = score_examples(loaded.model, examples, pad_token_id=loaded.tokenizer.pad_token_id,
                                max_tokens=cfg.heldout.max_tokens)
        nll, n = sum(s.nll_sum for s in scored), sum(s.n_tokens for s in scored)
        per = [s.loss for s in scored if s.n_tokens]
        out[name] = {"path": str(path), "samples": len(records), "tokens": n,
                     "loss": nll / n if n else math.nan,
                     "mean_sample_loss": sum(per) / len(per) if per else math.nan}
    del loaded
    release_memory()
    return out


def _heldout_sets(cfg: AlignConfig) -> dict[str, Path]:
    return {name: path for name, path in ((DOMAIN, cfg.heldout.domain), (GENERAL, cfg.heldout.general)) if path}


def before_after_table(before: dict, after: dict) -> list[dict]:
    rows = []
    for name in (DOMAIN, GENERAL):
        if name in before and name in after:
            b, a = before[name]["loss"], after[name]["loss"]
            rows.append({"set": f"{name} (vs {ROUTE_TEACHER[name]}'s responses)", "samples": before[name]["samples"],
                         "tokens": before[name]["tokens"], "loss_before": b, "loss_after": a, "change": a - b})
    return rows


# ---------------------------------------------------------------- optional judged scores


def judged_scores(cfg: AlignConfig, model_spec: str, out: Path) -> dict[str, Any]:
    """`teacherfit evaluate` on one model with the run's `evaluate` settings; the headline numbers."""
    from teacherfit.pipelines.evaluate import run_evaluate

    settings = dict(cfg.evaluate or {})
    settings.update(student={"name": "student", "model": str(model_spec)}, out=str(out))
    settings.setdefault("models", cfg.models.model_dump())
    result = run_evaluate(EvaluateConfig.model_validate(settings)).results
    scores = {}
    if "mtbench" in result:
        scores["MT-Bench score (1-10)"] = result["mtbench"]["overall"]["score"]
    if "pairwise" in result:
        scores["win rate vs reference"] = result["pairwise"]["win_rate"]["win_rate"]
        scores["length-controlled win rate"] = result["pairwise"]["lc_win_rate"]["lc_win_rate"]
    if "reward_win_rate" in result:
        scores["reward-model win rate"] = result["reward_win_rate"]["win_rate"]
    if "heldout_loss" in result:
        scores["evaluate held-out loss"] = result["heldout_loss"]["mean"]
    return {"run_dir": str(out), "scores": scores}


# ---------------------------------------------------------------- the run


def run_align(cfg: AlignConfig, *, resume: bool = True, dry_run: bool = False) -> dict[str, Any]:
    kd_on = cfg.kd.lambda_ > 0 and cfg.kd.w_pred > 0
    # a dry run without teachers is a routing preview; with them, their checks run too
    named = any((cfg.expert, cfg.expert_cache, cfg.reference, cfg.reference_cache))
    kd_on = kd_on and (named or not dry_run)
    sources = _teacher_sources(cfg) if kd_on else {}

    # 1) routing and the training mix (only the small embedding model, if any, is loaded)
    records = training_records(cfg.data)
    routing = route(records, cfg.routing)
    mix = (resample_to_share(routing.domain, cfg.domain_share, seed=cfg.train.seed)
           if cfg.domain_share is not None else list(range(len(records))))
    routed = routing_summary(cfg, records, routing, mix)
    route_of = {example_key(r): (DOMAIN if routing.domain[i] else GENERAL) for i, r in enumerate(records)}

    # 2) the shared preparation (compatibility, tokenisation, cache coverage per route), before any weights;
    # held-out files read
    job = prepare(cfg, [records[i] for i in mix], sources, route_of=route_of)
    for path in _heldout_sets(cfg).values():
        load_records(path, require_response=True)

    # the inputs hold up: the run starts here (named by the config as given, as distill's)
    run_dir = prepare_run_dir(cfg, "align")
    cfg = job.cfg  # max_length clipped to the student's context
    main = is_main_process()  # routing, held-out and judged scores, results: once, by the main process
    if main:
        atomic_write_text(run_dir / "routing.jsonl", "".join(
            json.dumps(row) + "\n" for row in routing_rows(records, routing, cfg.routing.text)))
        print_routing(routed)
    if dry_run:
        if main:
            atomic_write_json(run_dir / "routing.json", routed)
        return {"run_dir": str(run_dir), "routing": routed, "dry_run": True}
    if kd_on:
        empty = [ROUTE_TEACHER[n] for n, c in routed["counts"].items() if c == 0]
        if empty:
            console.print(f"[yellow]note:[/] no sample is routed to the {empty[0]}: its model is never loaded")

    # 3) held-out losses of the untrained student (cached in the run directory for resumes)
    sets = _heldout_sets(cfg)
    before = cached_json(run_dir / "heldout_before.json", lambda: heldout_losses(cfg.student, sets, cfg)) if main else {}

    # 4) train: the distillation runtime with one teacher per route
    reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result, student_prov = train_job(job, run_dir, resume=resume, label="align",
                                     card=model_card_info(job, f"{cfg.student} aligned by teacherfit (DAE)", ["dae"]))
    memory = {"train_peak_rss_mb": peak_rss_mb(),
              "teachers_in_memory": sum(1 for s in sources.values() if s.kind == "model"),
              "teachers_from_student": sum(1 for s in sources.values() if s.kind == "self"),
              "teachers_cached": sum(1 for s in sources.values() if s.kind == "cache")}
    if torch.cuda.is_available():
        memory["train_peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    release_memory()  # the training copy is gone: the held-out scoring loads the final model
    summary = {
        **result.summary(),
        "student": student_prov,
        "teachers": {ROUTE_TEACHER[n]: job.teachers_loaded.get(n, {"model": s.where, "used": False})
                     for n, s in sources.items()},
        "loss": {"lambda": cfg.kd.lambda_, "temperature": cfg.kd.temperature, "divergence": cfg.kd.divergence},
        "routing": routed,
        "examples": job.stats,
        "memory": memory,
        "notes": job.notes,
    }
    if not main:
        return summary

    # 5) held-out losses of the trained student, and optional judged scores before and after
    after = heldout_losses(result.model_dir, sets, cfg)
    judged = None
    if cfg.evaluate is not None:
        judged = {"before": cached_json(run_dir / "evaluate_before.json",
                                         lambda: judged_scores(cfg, cfg.student, run_dir / "evaluate" / "before")),
                  "after": judged_scores(cfg, str(result.model_dir), run_dir / "evaluate" / "after")}
    summary.update(heldout={"before": before, "after": after, "table": before_after_table(before, after)},
                   judged=judged)
    atomic_write_json(run_dir / "results.json", summary)
    align_report(summary, result.log).write(run_dir / "report.html")
    for row in summary["heldout"]["table"]:
        console.print(f"{row['set']}: loss {row['loss_before']:.4f} -> {row['loss_after']:.4f} ({row['change']:+.4f})")
    console.print(f"student saved to {result.model_dir}; report: {run_dir / 'report.html'}")
    return summary


def align_report(summary: dict[str, Any], log: list[dict]):
    from teacherfit import report as R

    routed = summary["routing"]
    rep = R.Report("teacherfit align", f"Domain Alignment from Expert: {summary['steps']} optimizer steps, "
                                       f"student {summary['student'].get('model')}")
    loss = summary["loss"]
    rep.add_kv({"loss": f"(1 - {loss['lambda']}) CE + {loss['lambda']} tau^2 KL(p* || p_S), tau = {loss['temperature']}; "
                        "p* = the expert's distribution on domain samples, the reference model's on the others",
                "student": summary["student"], "expert": summary["teachers"].get("expert", "none"),
                "reference": summary["teachers"].get("reference", "none"),
                "examples": summary["examples"], "memory": summary["memory"]})
    for note in summary["notes"]:
        rep.add_note(note)
    rep.add_heading("Domain gain, general loss: before and after")
    table = summary["heldout"]["table"]
    if table:
        rep.add_table(table, ["set", "samples", "tokens", "loss_before", "loss_after", "change"],
                      caption="Student mean token loss (nats) on held-out responses of the expert (domain) and the "
                              "reference model (general); lower is closer to that teacher")
        rep.add_image(R.plot_grouped_bars([r["set"].split(" ")[0] for r in table],
                                          {"before": [r["loss_before"] for r in table],
                                           "after": [r["loss_after"] for r in table]},
                                          title="Held-out loss before and after DAE", ylabel="loss (nats/token)"),
                      alt="held-out loss before and after")
    else:
        rep.add_paragraph("No held-out sets were given (heldout.domain, heldout.general).")
    if summary.get("judged"):
        b, a = summary["judged"]["before"]["scores"], summary["judged"]["after"]["scores"]
        rep.add_table([{"signal": k, "before": b.get(k), "after": a.get(k)} for k in b],
                      ["signal", "before", "after"], caption="Judged scores (teacherfit evaluate) before and after")
    else:
        rep.add_paragraph("Judged scores: not run (set `evaluate:` to run `teacherfit evaluate` before and after).")
    rep.add_heading("Routing")
    c = routed["counts"]
    mix = routed["mix"]
    kv = {"source": routed["source"], "domain -> expert": c[DOMAIN], "general -> reference": c[GENERAL],
          "domain share as routed": f"{routed['share_before']:.3f}",
          "domain share trained on": f"{routed['share_after']:.3f} ({mix['samples']} samples, {mix['distinct']} distinct; "
                                     f"{mix['sampling']})"}
    if "agreement_with_flag" in routed:
        a = routed["agreement_with_flag"]
        kv[f"agreement with the {a['field']!r} flag"] = f"{a['agree']} / {a['n']}"
    if routed["info"]:
        kv["classifier"] = routed["info"]
    rep.add_kv(kv)
    if routed["borderline"]:
        rep.add_table(routed["borderline"], ["id", "route", "probability", "text"],
                      caption=f"Borderline samples: P(domain) closest to the threshold {routed['threshold']} "
                              "(all routes in routing.jsonl)")
    if log:
        steps = [r["step"] for r in log]
        names = ["loss", "ce", "kd"] + [k for k in log[0] if k.startswith("kd_")]
        rep.add_heading("Training")
        rep.add_image(R.plot_lines({n: (steps, [r.get(n, 0.0) for r in log]) for n in names},
                                   title="Training losses (kd_domain + kd_general = kd)", xlabel="optimizer step",
                                   ylabel="loss"), alt="loss curves")
        rep.add_table(log[-10:], ["step", *names, "lr", "grad_norm", "tokens"], caption="Last logged steps")
    return rep


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines() if line.strip()]
