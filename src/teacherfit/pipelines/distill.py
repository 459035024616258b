"""`teacherfit distill`: train a student from a teacher (sequence, logit and attention KD).

The sequence: training data -> student (loaded, or built from a subset of its layers) -> compatibility
check against the teacher (before any weights of the teacher are loaded) -> tokenized examples ->
optional LoRA -> the training runtime (`distill.train`) -> final model, log, report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from teacherfit.config import AlignConfig, DistillConfig, StudentInit, prepare_run_dir
from teacherfit.distill.compat import check_kd_compatibility
from teacherfit.distill.examples import tokenize_records, training_records
from teacherfit.distill.train import CachedTeacher, OnlineTeacher, decoder_of, layers_of, train
from teacherfit.models import load_model, load_text_config, load_tokenizer
from teacherfit.scoring import text_config
from teacherfit.store import atomic_write_json
from teacherfit.ui import console


def select_layers(spec: str | list[int], n_layers: int) -> list[int]:
    """'every_other' -> 0, 2, 4...; 'first:N'; or explicit indices (validated)."""
    if spec == "every_other":
        return list(range(0, n_layers, 2))
    if isinstance(spec, str) and spec.startswith("first:"):
        n = int(spec.split(":", 1)[1])
        if not 1 <= n <= n_layers:
            raise ValueError(f"student_init.layers {spec!r}: N must be in 1..{n_layers}")
        return list(range(n))
    if isinstance(spec, list) and spec and all(isinstance(i, int) and 0 <= i < n_layers for i in spec):
        return list(spec)
    raise ValueError(f"student_init.layers must be 'every_other', 'first:N' or indices in 0..{n_layers - 1}, got {spec!r}")


def shrink_layers(model: nn.Module, init: StudentInit) -> nn.Module:
    """Keep a subset of the decoder layers (the rest of the model unchanged): a smaller student that starts
    from the teacher's own weights."""
    decoder = decoder_of(model)
    keep = select_layers(init.layers, len(decoder.layers))
    decoder.layers = nn.ModuleList([decoder.layers[i] for i in keep])
    for new_index, layer in enumerate(decoder.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_index  # KV cache and attention capture address layers by this index
    cfg = text_config(model.config)
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    return model


def build_student(cfg: DistillConfig | AlignConfig):
    # master weights in fp32; on CUDA accelerate runs the forward in bf16 autocast
    loaded = load_model(cfg.student, device="cpu", dtype="float32", trust_remote_code=cfg.models.trust_remote_code)
    model = loaded.model
    if getattr(cfg, "student_init", None) is not None:  # distill only
        model = shrink_layers(model, cfg.student_init)
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(cfg.train.seed)  # LoRA's A matrices are random: the same config gives the same init
        model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM"))
    model.train()
    model.config.use_cache = False
    return model, loaded.tokenizer, loaded.provenance


def run_distill(cfg: DistillConfig, *, resume: bool = True, dry_run: bool = False) -> dict[str, Any]:
    """Train the student; with ``dry_run``, run every check that needs no weights and print what would run.

    The checks (data files, tokenizers and head sizes, the cache's tokenizer digest, max_length and rows, the
    student_init and layer-map specs against the configs' layer counts) all come before any weights are read,
    so a dry run and a real run refuse the same inputs; a dry run then returns without writing anything.
    """
    from teacherfit.distill.train import Schedule
    from teacherfit.scoring import post_head_of

    if cfg.teacher and cfg.teacher_cache:
        raise ValueError("give either teacher (online) or teacher_cache (offline), not both")
    kd_on = cfg.kd.lambda_ > 0 and (cfg.kd.w_pred > 0 or cfg.kd.w_attn > 0)
    if kd_on and not (cfg.teacher or cfg.teacher_cache):
        raise ValueError("kd.lambda > 0 needs a teacher or a teacher_cache (or set kd.lambda=0 for sequence-level KD)")
    if cfg.teacher_cache and cfg.kd.w_attn > 0 and cfg.kd.lambda_ > 0:
        raise ValueError("attention KD needs the online teacher (the cache holds next-token distributions only): "
                         "set kd.w_attn=0 or give `teacher`")
    records = training_records(cfg.data)
    trust = cfg.models.trust_remote_code
    tokenizer = load_tokenizer(cfg.student, trust_remote_code=trust)
    s_cfg, s_text = load_text_config(cfg.student, trust_remote_code=trust)
    student_rows = s_text.vocab_size
    student_layers = s_text.num_hidden_layers
    if getattr(cfg, "student_init", None) is not None:
        student_layers = len(select_layers(cfg.student_init.layers, student_layers))
    notes: list[str] = []
    vocab = None
    cache = None
    teacher_layers = None
    plan_teacher: dict[str, Any] | None = None
    if cfg.teacher and kd_on:
        # tokenizers and configs first: a mismatch is refused before the teacher's weights are read
        teacher_tok = load_tokenizer(cfg.teacher, trust_remote_code=trust)
        t_cfg, t_text = load_text_config(cfg.teacher, trust_remote_code=trust)
        compat = check_kd_compatibility(tokenizer, teacher_tok, student_rows=student_rows, teacher_rows=t_text.vocab_size,
                                        student_name=cfg.student, teacher_name=cfg.teacher)
        vocab, notes = compat.vocab, compat.notes
        teacher_layers = t_text.num_hidden_layers
        plan_teacher = {"model": cfg.teacher, "post_head": str(post_head_of(t_cfg))}
    if cfg.teacher_cache and kd_on:
        from teacherfit.distill.cache import TopKCache

        if cfg.kd.divergence != "forward_kl":
            raise ValueError("the top-k teacher cache supports kd.divergence=forward_kl only")
        cache = TopKCache(cfg.teacher_cache)
        cache.check_compatible(tokenizer, cfg.train.max_length, student_rows=student_rows)
        if student_rows > cache.vocab_rows:  # the student's padded rows are left out, as on the online path
            vocab = cache.vocab_rows
        # how the cache's rows are laid out (e.g. tail draws) is part of the loss
        kd = cfg.kd.model_copy(update={"divergence_kwargs": {**cfg.kd.divergence_kwargs, **cache.loss_kwargs()}})
        cfg = cfg.model_copy(update={"kd": kd})
        plan_teacher = {"cache": str(cache.folder), "examples": len(cache), **cache.meta.get("teacher", {})}
    context = getattr(s_text, "max_position_embeddings", None)
    if context and cfg.train.max_length > context:
        notes.append(f"train.max_length={cfg.train.max_length} exceeds the student's context ({context}): using {context}")
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_length": context})})
    examples, stats = tokenize_records(records, tokenizer, cfg.train.max_length)
    if stats["truncated"]:
        notes.append(f"{stats['truncated']} examples longer than max_length={cfg.train.max_length} were truncated")
    if stats["no_response_tokens"]:
        notes.append(f"{stats['no_response_tokens']} examples had no response token left and were not used")
    if cache is not None:
        missing = [e.key for e in examples if e.key not in cache]
        if missing:
            raise ValueError(f"{len(missing)} training examples are not in the teacher cache {cfg.teacher_cache}: "
                             "run `teacherfit cache-teacher` on the same data")
    attn_on = bool(cfg.teacher and kd_on and cfg.kd.w_attn > 0)
    layer_map = None
    if attn_on:
        from teacherfit.distill.attention import parse_layer_map

        layer_map = parse_layer_map(cfg.kd.layer_map, student_layers, teacher_layers)
    if not examples:
        raise ValueError("no training example has a response token left: check the data and train.max_length")

    if dry_run:
        schedule = Schedule(len(examples), cfg.train)
        plan = {"dry_run": True, "examples": stats, "steps": schedule.total_steps,
                "steps_per_epoch": schedule.steps_per_epoch, "student": cfg.student, "student_layers": student_layers,
                "student_post_head": str(post_head_of(s_cfg)), "teacher": plan_teacher,
                "vocab": vocab, "layer_map": {str(k): v for k, v in (layer_map or {}).items()}, "notes": notes}
        for note in notes:
            console.print(f"[yellow]note:[/] {note}")
        console.print(f"dry run: {stats['examples']} examples, {schedule.total_steps} optimizer steps "
                      f"({schedule.steps_per_epoch} per epoch), student {cfg.student} ({student_layers} layers), "
                      f"teacher {plan_teacher or 'none (kd.lambda=0)'}; nothing loaded, nothing written")
        return plan

    run_dir = prepare_run_dir(cfg, "distill")
    student, tokenizer, student_prov = build_student(cfg)
    teacher_loaded = None
    if cfg.teacher and kd_on:
        teacher_loaded = load_model(cfg.teacher, device=cfg.teacher_device or cfg.models.device,
                                    dtype=cfg.models.dtype, trust_remote_code=trust)

    def teacher_factory(student_device: torch.device):
        if teacher_loaded is not None:
            return OnlineTeacher(teacher_loaded.model, vocab=vocab, attn_layers=sorted(set(layer_map.values())) if layer_map else None,
                                 device=teacher_loaded.device, student_device=student_device)
        if cache is not None:
            return CachedTeacher(cache, student_device)
        return None

    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    result = train(cfg, run_dir, student, tokenizer, examples, teacher_factory, vocab=vocab, layer_map=layer_map,
                   resume=resume)
    summary = {
        **result.summary(),
        "examples": stats,
        "student": student_prov,
        "student_layers": layers_of(student),
        "teacher": teacher_loaded.provenance if teacher_loaded else (cache.meta.get("teacher") if cache else None),
        "layer_map": {str(k): v for k, v in (layer_map or {}).items()},
        "notes": notes,
    }
    atomic_write_json(run_dir / "summary.json", summary)
    from teacherfit.pipelines.reports import distill_report

    distill_report(summary, result.log).write(run_dir / "report.html")
    console.print(f"student saved to {result.model_dir}; report: {run_dir / 'report.html'}")
    return summary


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines() if line.strip()]
