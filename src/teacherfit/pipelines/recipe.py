"""The training recipe `distill` and `align` share: one preparation sequence, one way to build teachers, one run.

`distill` is `align` with a single route. Each command names its teachers as ``TeacherSource``s, one per route
(distill: the teacher, online or cached; align: the domain expert and the general reference, online, cached or
the student's own starting weights), and its training records; then:

1. ``prepare`` (no weights read): the student's tokenizer and config, ``student_init``'s layer count, each
   teacher's tokenizer and head rows against the student's (or its cache's digest, max_length and rows), the
   shared head size, the context clip, tokenisation with response-only labels (truncations counted, noted), cache
   coverage per route, the attention-KD layer map. A dry run stops here, having refused what a real run would.
2. ``train_job``: builds the student (and its LoRA), the teacher factory (each teacher loaded after the
   Accelerator exists, on ``accelerator.device``, sharded like the student under FSDP2 / ZeRO-3), the model card,
   and runs the training runtime (``distill.train``).

What stays in each command is what is theirs: distill's plan and report; align's routing, held-out and judged
scores before and after.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from teacherfit.config import StudentInit, TrainingJob
from teacherfit.data import Record
from teacherfit.distill.compat import check_kd_compatibility
from teacherfit.distill.examples import TrainExample, tokenize_records
from teacherfit.distill.train import TrainResult, train
from teacherfit.models import decoder_of, load_model, load_text_config, load_tokenizer
from teacherfit.scoring import post_head_of, text_config
from teacherfit.ui import console

STUDENT_ITSELF = "student"  # a teacher that is the student's own starting weights (align's `reference: student`)


@dataclass
class TeacherSource:
    """Where one route's teacher comes from: a model ("model"), a top-k cache ("cache"), or the student's own
    starting weights ("self": a LoRA student with its adapters off)."""

    route: str
    role: str  # how messages, reports and the model card name it: teacher, expert, reference
    kind: str
    where: str | Path | None


@dataclass
class Job:
    """A checked training job: everything a run needs that reading weights does not decide."""

    cfg: TrainingJob  # max_length clipped to the student's context
    examples: list[TrainExample]
    stats: dict[str, int]
    notes: list[str]
    vocab: int | None  # head rows both sides are cut to (None: equal)
    sources: dict[str, TeacherSource]
    caches: dict[str, Any]
    layer_map: dict[int, int] | None
    student_layers: int
    student_post_head: str
    route_of: dict[str, str] | None  # example key -> route (several routes); None: one route
    tokenizer: Any = None  # the student's
    teachers_loaded: dict[str, dict] = field(default_factory=dict)  # filled as teachers are built


# ---------------------------------------------------------------- the student


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


def build_student(cfg: TrainingJob):
    """The student on the CPU in fp32 master weights (accelerate moves it; on CUDA the forward runs in bf16
    autocast), cut to ``student_init``'s layers, with LoRA adapters when asked (seeded: same config, same init)."""
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


# ---------------------------------------------------------------- checks, before any weights


def prepare(cfg: TrainingJob, records: list[Record], sources: dict[str, TeacherSource], *,
            route_of: dict[str, str] | None = None, attention: bool = False) -> Job:
    """Every check that needs no weights, in one sequence for every training command (see the module doc)."""
    from teacherfit.launch import launched_processes

    trust = cfg.models.trust_remote_code
    if cfg.teacher_device and launched_processes() > 1:
        raise ValueError(f"teacher_device={cfg.teacher_device!r} names one device, but {launched_processes()} "
                         "processes train: each puts its teachers on its own device; unset teacher_device")
    notes: list[str] = []
    if cfg.kd.on_policy > 0:
        check_rollouts(cfg)
        r = cfg.rollout
        if cfg.kd.divergence == "sampled_reverse_kl" and (r.temperature != 1 or r.top_p != 1 or r.buffer_steps > 1):
            notes.append("sampled_reverse_kl estimates KL(p_S || p_T) from samples of p_S itself: with rollout "
                         f"temperature {r.temperature:g}, top_p {r.top_p:g}, buffer_steps {r.buffer_steps} the "
                         "samples come from another distribution, and the estimate is biased")
    tokenizer = load_tokenizer(cfg.student, trust_remote_code=trust)
    s_cfg, s_text = load_text_config(cfg.student, trust_remote_code=trust)
    student_rows = s_text.vocab_size
    student_layers = s_text.num_hidden_layers
    if getattr(cfg, "student_init", None) is not None:
        student_layers = len(select_layers(cfg.student_init.layers, student_layers))
    several = len(sources) > 1
    rows, caches, teacher_layers = [student_rows], {}, None
    for route, src in sources.items():
        if src.kind == "model":
            # tokenizers and configs first: a mismatch is refused before the teacher's weights are read
            tok = load_tokenizer(str(src.where), trust_remote_code=trust)
            t_text = load_text_config(str(src.where), trust_remote_code=trust)[1]
            compat = check_kd_compatibility(tokenizer, tok, student_rows=student_rows, teacher_rows=t_text.vocab_size,
                                            student_name=cfg.student,
                                            teacher_name=f"{src.role} {src.where}" if several else str(src.where))
            notes += [f"{src.role}: {n}" if several else n for n in compat.notes]
            rows.append(t_text.vocab_size)
            teacher_layers = t_text.num_hidden_layers
        elif src.kind == "server":
            server, divergence = src.where.server, cfg.kd.divergence
            allowed = ("sampled_reverse_kl",) if server == "llama_cpp" else ("forward_kl", "sampled_reverse_kl")
            if divergence not in allowed:
                gives = "the sampled tokens' log-probs only" if server == "llama_cpp" else "top-k log-probs"
                raise ValueError(f"a {src.role} behind a {server} server gives {gives}: set kd.divergence to "
                                 f"{' or '.join(allowed)} (it is {divergence})")
            if cfg.kd.divergence_kwargs.get("tail_samples"):
                raise ValueError(f"kd.divergence_kwargs.tail_samples reads a cache's tail draws; a {src.role} behind a "
                                 "server returns a plain top-k: remove it")
        elif src.kind == "cache":
            from teacherfit.distill.cache import TopKCache

            if cfg.kd.on_policy > 0:
                raise ValueError(f"kd.on_policy={cfg.kd.on_policy:g}: the {src.role} cache holds distributions on the "
                                 "dataset's responses, not on the student's samples: give the model itself "
                                 f"(`{src.role}` instead of `{src.role}_cache`), or set kd.on_policy=0")

            if cfg.kd.divergence != "forward_kl":
                raise ValueError(f"the top-k cache of the {src.role} supports kd.divergence=forward_kl only")
            cache = TopKCache(src.where)
            cache.check_compatible(tokenizer, cfg.train.max_length, student_rows=student_rows)
            caches[route] = cache
            rows.append(cache.vocab_rows)  # the cache's ids cover the tokenizer only: padded rows are left out
    vocab = min(rows) if len(set(rows)) > 1 else None
    context = getattr(s_text, "max_position_embeddings", None)
    if context and cfg.train.max_length > context:
        notes.append(f"train.max_length={cfg.train.max_length} exceeds the student's context ({context}): using {context}")
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_length": context})})
    examples, stats = tokenize_records(records, tokenizer, cfg.train.max_length)
    if stats["truncated"]:
        notes.append(f"{stats['truncated']} examples longer than max_length={cfg.train.max_length} were truncated")
    if stats["no_response_tokens"]:
        notes.append(f"{stats['no_response_tokens']} examples had no response token left and were not used")
    for route, cache in caches.items():
        role = sources[route].role
        missing = [e.key for e in examples if (route_of is None or route_of[e.key] == route) and e.key not in cache]
        if missing:
            raise ValueError(f"{len(missing)} training examples{f' routed to the {role}' if several else ''} are not "
                             f"in the {role} cache {cache.folder}: run `teacherfit cache-teacher` on the same data")
    servers = [src for src in sources.values() if src.kind == "server"]
    for src in servers:  # the server must tokenize the student's text back to the student's ids
        from teacherfit.distill.teachers import check_server_tokenizer

        check_server_tokenizer(src.where, tokenizer, [tokenizer.decode(e.tokens.input_ids, skip_special_tokens=False)
                                                      for e in examples[:2]])
    layer_map = None
    if attention:
        from teacherfit.distill.attention import parse_layer_map

        layer_map = parse_layer_map(cfg.kd.layer_map, student_layers, teacher_layers)
    if not examples:
        raise ValueError("no training example has a response token left: check the data and train.max_length")
    return Job(cfg, examples, stats, notes, vocab, sources, caches, layer_map, student_layers,
               str(post_head_of(s_cfg)), route_of, tokenizer)


def check_rollouts(cfg: TrainingJob) -> None:
    """What the rollout engine needs, checked before any weights: vLLM and a GPU for 'vllm', the key for 'openai'."""
    from teacherfit.launch import launched_processes

    opts, kd = cfg.rollout, cfg.kd
    if kd.lambda_ < 1:
        raise ValueError(f"kd.lambda={kd.lambda_:g} with kd.on_policy: the CE term would train the student to imitate its "
                         "own samples (GKD and the on-policy recipes have none); set kd.lambda=1 (the dataset rows of "
                         "kd.on_policy < 1 still carry the teacher's responses)")
    if kd.w_pred == 0 and kd.w_attn == 0:
        raise ValueError("kd.on_policy with no KD term (kd.w_pred = kd.w_attn = 0) learns nothing from the teacher")
    if opts.engine == "vllm":
        from teacherfit.generation import check_vllm_engine

        if getattr(cfg, "student_init", None) is not None:
            raise ValueError("rollout.engine vllm loads the student's checkpoint into vLLM, and student_init builds "
                             "another model from it: save that student first, or use rollout.engine transformers")
        if launched_processes() > 1:
            raise ValueError(f"rollout.engine vllm runs one engine in one process, and {launched_processes()} train: "
                             "use rollout.engine transformers (each process samples its rows) or serve the student "
                             "(rollout.engine openai)")
        check_vllm_engine(opts.vllm_engine(cfg.train.max_length), "rollout.vllm")
        if not torch.cuda.is_available():
            raise ValueError("rollout.engine vllm runs vLLM on the training GPU, and no GPU is visible here: use "
                             "rollout.engine transformers (the default) on CPUs")
    elif opts.engine == "openai":
        opts.remote.check_key()


# ---------------------------------------------------------------- the run


def _teacher(job: Job, src: TeacherSource, accelerator, student: nn.Module):
    """One route's teacher, built once the Accelerator exists: on its device, sharded like the student."""
    from teacherfit.distill.teachers import CachedTeacher, OnlineTeacher, StartingWeightsTeacher
    from teacherfit.launch import is_sharded, shard_frozen
    from teacherfit.models import pick_dtype

    cfg, device = job.cfg, accelerator.device
    if src.kind == "self":
        if is_sharded(accelerator):
            raise ValueError(f"the {src.role} as the student's starting weights runs outside the student's sharded "
                             f"forward: under FSDP2 / ZeRO-3 give the model itself (`{src.role}: {cfg.student}`)")
        job.teachers_loaded[src.route] = {"model": cfg.student,
                                          "kind": "the student's starting weights (LoRA adapters off)"}
        return StartingWeightsTeacher(student, vocab=job.vocab, student_device=device)
    if src.kind == "server":
        from teacherfit.distill.teachers import ServerTeacher

        job.teachers_loaded[src.route] = {"server": src.where.server, **src.where.remote.identity()}
        mode = "sampled" if cfg.kd.divergence == "sampled_reverse_kl" else "topk"
        return ServerTeacher(src.where, job.tokenizer, mode=mode, student_device=device)
    if src.kind == "cache":
        cache = job.caches[src.route]
        job.teachers_loaded[src.route] = {"cache": str(cache.folder), **cache.meta.get("teacher", {})}
        return CachedTeacher(cache, device)
    console.print(f"loading the {src.role} {src.where}")
    shard = is_sharded(accelerator) and accelerator.num_processes > 1
    # a sharded teacher is split before it moves to the device, so no process ever holds it whole there
    place = "cpu" if shard else (cfg.teacher_device or str(device))
    dtype = str(pick_dtype(cfg.models.dtype, device if shard else torch.device(place))).removeprefix("torch.")
    loaded = load_model(str(src.where), device=place, dtype=dtype, trust_remote_code=cfg.models.trust_remote_code)
    sharded = shard_frozen(loaded.model, accelerator)
    if sharded:
        loaded.model.to(device)
    job.teachers_loaded[src.route] = loaded.provenance
    attn_layers = sorted(set(job.layer_map.values())) if job.layer_map else None
    return OnlineTeacher(loaded.model, vocab=job.vocab, attn_layers=attn_layers,
                         device=device if sharded else loaded.device, student_device=device, sharded=sharded)


def model_card_info(job: Job, title: str, tags: list[str]) -> dict[str, Any]:
    cfg = job.cfg
    return {"title": title, "tags": tags, "base_model": cfg.student,
            "teachers": {src.role: (f"{cfg.student} (starting weights)" if src.kind == "self" else
                                    src.where.remote.model if src.kind == "server" else src.where)
                         for src in job.sources.values()},
            "data": [str(r.path) for r in cfg.data.responses] + ([str(cfg.data.best_of_rank)] if cfg.data.best_of_rank else []),
            "examples": job.stats.get("examples"),
            "loss": f"{cfg.kd.divergence}, temperature {cfg.kd.temperature}",
            "weights": cfg.kd.weights().model_dump(),
            "lora": cfg.lora.model_dump() if cfg.lora else None,
            "command": shlex.join(["teacherfit", *sys.argv[1:]])}


def train_job(job: Job, run_dir: Path, *, resume: bool = True, label: str = "distill",
              card: dict[str, Any] | None = None) -> tuple[TrainResult, dict]:
    """Build the student, run the training runtime with the job's teachers; returns the result and the student's
    provenance."""
    from teacherfit.distill.teachers import RoutedTeacher

    cfg = job.cfg
    student, tokenizer, student_prov = build_student(cfg)

    def teacher_factory(accelerator):
        if not job.sources:
            return None
        if job.route_of is None:  # one route
            (src,) = job.sources.values()
            return _teacher(job, src, accelerator, student)
        factories = {route: (lambda s=src: _teacher(job, s, accelerator, student)) for route, src in job.sources.items()}
        return RoutedTeacher(factories, job.route_of, eager=accelerator.num_processes > 1)

    from teacherfit.launch import is_main_process, quiet

    with quiet(not is_main_process()):
        for note in job.notes:
            console.print(f"[yellow]note:[/] {note}")
    result = train(cfg, run_dir, student, tokenizer, job.examples, teacher_factory, vocab=job.vocab,
                   layer_map=job.layer_map, rebuild_student=lambda: build_student(cfg)[0],
                   card=card or model_card_info(job, "Distilled student", []), resume=resume, label=label)
    return result, student_prov
