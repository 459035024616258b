"""`teacherfit distill`: train a student from a teacher (sequence, logit and attention KD).

`distill` is the shared recipe (``pipelines.recipe``) with one route: training data -> the teacher's source
(online model, top-k cache, or none for sequence-level KD) -> ``prepare`` (compatibility, tokenisation, cache
coverage, layer map; no weights read) -> the plan (``--dry-run``) or ``train_job`` (student, teacher on
accelerate's device, training runtime, the model as shipped) -> summary and report, written by the main process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from teacherfit.config import DistillConfig, ServerTeacherConfig, prepare_run_dir
from teacherfit.distill.examples import training_records
from teacherfit.launch import is_main_process
from teacherfit.pipelines.recipe import TeacherSource, model_card_info, prepare, train_job
from teacherfit.store import atomic_write_json
from teacherfit.ui import console

ROUTE = "teacher"  # distill's one route


def teacher_source(cfg: DistillConfig) -> dict[str, TeacherSource]:
    """The one route's teacher (online or cached), or none for sequence-level KD (kd.lambda = 0)."""
    if cfg.teacher and cfg.teacher_cache:
        raise ValueError("give either teacher (online) or teacher_cache (offline), not both")
    kd_on = cfg.kd.lambda_ > 0 and (cfg.kd.w_pred > 0 or cfg.kd.w_attn > 0)
    if kd_on and not (cfg.teacher or cfg.teacher_cache):
        raise ValueError("kd.lambda > 0 needs a teacher or a teacher_cache (or set kd.lambda=0 for sequence-level KD)")
    if cfg.teacher_cache and cfg.kd.w_attn > 0 and cfg.kd.lambda_ > 0:
        raise ValueError("attention KD needs the online teacher (the cache holds next-token distributions only): "
                         "set kd.w_attn=0 or give `teacher`")
    if isinstance(cfg.teacher, ServerTeacherConfig) and cfg.kd.w_attn > 0 and cfg.kd.lambda_ > 0:
        raise ValueError("attention KD needs the teacher in process (a server returns log-probabilities only): "
                         "set kd.w_attn=0 for a teacher behind a server")
    if not kd_on:
        return {}
    if isinstance(cfg.teacher, ServerTeacherConfig):
        return {ROUTE: TeacherSource(ROUTE, "teacher", "server", cfg.teacher)}
    if cfg.teacher:
        return {ROUTE: TeacherSource(ROUTE, "teacher", "model", cfg.teacher)}
    return {ROUTE: TeacherSource(ROUTE, "teacher", "cache", cfg.teacher_cache)}


def run_distill(cfg: DistillConfig, *, resume: bool = True, dry_run: bool = False) -> dict[str, Any]:
    """Train the student; with ``dry_run``, run every check that needs no weights and print what would run.

    The checks (``recipe.prepare``: data files, tokenizers and head sizes, the cache's tokenizer digest, max_length
    and rows, the student_init and layer-map specs against the configs' layer counts) all come before any weights
    are read, so a dry run and a real run refuse the same inputs; a dry run then returns without writing anything.
    """
    from teacherfit.distill.train import Schedule

    sources = teacher_source(cfg)
    records = training_records(cfg.data)
    attention = bool(cfg.teacher and sources and cfg.kd.w_attn > 0)
    job = prepare(cfg, records, sources, attention=attention)
    plan_teacher: dict[str, Any] | None = None
    if isinstance(cfg.teacher, ServerTeacherConfig) and sources:
        plan_teacher = {"server": cfg.teacher.server, **cfg.teacher.remote.identity()}
    elif cfg.teacher and sources:
        from teacherfit.models import load_model_config
        from teacherfit.scoring import post_head_of

        t_cfg = load_model_config(cfg.teacher, trust_remote_code=cfg.models.trust_remote_code)
        plan_teacher = {"model": cfg.teacher, "post_head": str(post_head_of(t_cfg))}
    elif sources:
        cache = job.caches[ROUTE]
        plan_teacher = {"cache": str(cache.folder), "examples": len(cache), **cache.meta.get("teacher", {})}
    layer_map = {str(k): v for k, v in (job.layer_map or {}).items()}

    if dry_run:
        schedule = Schedule(len(job.examples), job.cfg.train)
        plan = {"dry_run": True, "examples": job.stats, "steps": schedule.total_steps,
                "on_policy": cfg.kd.on_policy, "rollout": cfg.rollout.engine if cfg.kd.on_policy else None,
                "steps_per_epoch": schedule.steps_per_epoch, "student": cfg.student,
                "student_layers": job.student_layers, "student_post_head": job.student_post_head,
                "teacher": plan_teacher, "vocab": job.vocab, "layer_map": layer_map, "notes": job.notes}
        for note in job.notes:
            console.print(f"[yellow]note:[/] {note}")
        console.print(f"dry run: {job.stats['examples']} examples, {schedule.total_steps} optimizer steps "
                      f"({schedule.steps_per_epoch} per epoch), student {cfg.student} ({job.student_layers} layers), "
                      f"teacher {plan_teacher or 'none (kd.lambda=0)'}; nothing loaded, nothing written")
        return plan

    run_dir = prepare_run_dir(cfg, "distill")
    result, student_prov = train_job(job, run_dir, resume=resume, label="distill",
                                     card=model_card_info(job, f"{cfg.student} distilled by teacherfit", ["kd"]))
    summary = {
        **result.summary(),
        "examples": job.stats,
        "student": student_prov,
        "student_layers": job.student_layers,
        "teacher": job.teachers_loaded.get(ROUTE),
        "layer_map": layer_map,
        "notes": job.notes,
    }
    if not is_main_process():  # one summary and one report per run, from the main process
        return summary
    atomic_write_json(run_dir / "summary.json", summary)
    from teacherfit.pipelines.reports import distill_report

    distill_report(summary, result.log).write(run_dir / "report.html")
    console.print(f"student saved to {result.model_dir}; report: {run_dir / 'report.html'}")
    return summary


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines() if line.strip()]
