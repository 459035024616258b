"""Teacher top-k cache: bytes per token against forward-KL accuracy, over K, tail treatment and stored dtypes.

The offline cache (`teacherfit cache-teacher`) keeps K entries of the teacher's next-token distribution
per response position instead of all of it. This benchmark measures what that costs in accuracy on the
packaged teacher/student pair (teacher qwen2.5-coder-1.5b-instruct, student qwen2.5-coder-0.5b-instruct,
same tokenizer) and real data (the first ``--examples`` of the teacher's own quickstart responses, tokenized
by ``tokenize_records`` at ``--max-length``):

  - reference: the full-vocabulary forward KL(teacher || student), ``losses.forward_kl``, mean over all
    response tokens, from both models' full logits at the loss positions (one example at a time, no
    padding);
  - for every K, tail treatment and stored encoding: the rows built by ``topk_with_tail_draws`` from the
    teacher's logits, written through ``TopKCacheWriter``, read back through ``TopKCache``, and
    ``losses.forward_kl_topk(..., **cache.loss_kwargs())`` against the same student logits.
    "bucket": K top entries, the missing mass as one outcome (a lower bound of the KL). "draws": K - K//4
    top entries and K//4 draws from the teacher's tail (an unbiased estimate). Relative error =
    (cached - full) / full. Bytes/token: the stored payload (``meta["bytes_per_token"]``) and, in
    brackets, the bytes of the cache files per token.

Target: at most 200 bytes per token with at most 1% relative error. The chosen setting (the pipeline's:
K = the config's default top_k, its default tail draws, the writer's default encoding) is marked, and
re-drawn with ``--seeds`` sampling seeds to show the spread of its error. Then ``run_cache_teacher``
itself runs with the chosen setting on the same examples (batched, padded) and must agree with the table.

    python benchmarks/bench_topk_cache.py                  # 8 examples, max length 384 (~5 minutes)
    python benchmarks/bench_topk_cache.py --examples 20 --ks 16 32 --no-pipeline
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import load_line, machine_line, print_table

from teacherfit.config import (
    CacheTeacherConfig,
    ModelOptions,
    ResponseSetConfig,
    TrainData,
)
from teacherfit.distill.cache import (
    DEFAULT_ENCODING,
    ENCODINGS,
    TopKCache,
    TopKCacheWriter,
    default_tail_samples,
    tail_uniforms,
    tokenizer_digest,
    topk_with_tail_draws,
)
from teacherfit.distill.examples import tokenize_records, training_records
from teacherfit.distill.losses import forward_kl, forward_kl_topk
from teacherfit.models import load_model
from teacherfit.pipelines.cache_teacher import run_cache_teacher
from teacherfit.pipelines.quickstart import ASSETS
from teacherfit.scoring import lm_head_logits

TEACHER = "qwen2.5-coder-1.5b-instruct"
STUDENT = "qwen2.5-coder-0.5b-instruct"
RESPONSES = ASSETS / "responses" / f"{TEACHER}.jsonl"
MAX_BYTES, MAX_REL_ERROR = 200, 0.01
DEFAULT_K = CacheTeacherConfig.model_fields["top_k"].default


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=8, help="first N quickstart responses (default: %(default)s)")
    ap.add_argument("--max-length", type=int, default=384, help="tokens per example (default: %(default)s)")
    ap.add_argument("--ks", type=int, nargs="+", default=[8, 16, 24, 32, 64], help="K values (default: %(default)s)")
    ap.add_argument("--encodings", nargs="+", default=["int32-fp32", "int32-fp16", "int32-fp16-lse"],
                    choices=list(ENCODINGS), help="stored encodings (default: %(default)s)")
    ap.add_argument("--seeds", type=int, default=10, help="sampling seeds for the chosen setting (default: %(default)s)")
    ap.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=True,
                    help="also run run_cache_teacher with the chosen setting and compare (default: on)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    return ap.parse_args()


@torch.inference_mode()
def loss_position_logits(model, input_ids: list[int], keep: torch.Tensor) -> torch.Tensor:
    """fp32 logits [N, V] at the loss positions of one example (no padding, LM head on those rows only)."""
    hidden = model.get_decoder()(input_ids=torch.tensor([input_ids])).last_hidden_state[0, :-1]
    return lm_head_logits(model, hidden[keep]).float()


def main() -> None:
    args = parse_args()
    data = TrainData(responses=[ResponseSetConfig(name=TEACHER, path=RESPONSES)], limit=args.examples)
    teacher, student = load_model(TEACHER, device="cpu"), load_model(STUDENT, device="cpu")
    vocab = teacher.model.get_output_embeddings().weight.shape[0]
    digest = tokenizer_digest(teacher.tokenizer)
    same_tokenizer = digest == tokenizer_digest(student.tokenizer)
    examples, stats = tokenize_records(training_records(data), teacher.tokenizer, args.max_length)
    ks = sorted(set(args.ks) | {DEFAULT_K})
    chosen = (DEFAULT_K, default_tail_samples(DEFAULT_K, vocab), DEFAULT_ENCODING)

    print(f"teacher: {TEACHER} ({teacher.provenance['sha256'][:12]}), student: {STUDENT} "
          f"({student.provenance['sha256'][:12]}), fp32; tokenizer digests equal: {same_tokenizer}")
    print(f"machine: {machine_line()}")
    print(f"data: {RESPONSES.name}, {len(examples)} examples, max_length {args.max_length}, "
          f"{sum(len(ex.tokens.input_ids) for ex in examples):,} tokens, "
          f"{sum(ex.tokens.n_response_tokens for ex in examples):,} response tokens; {stats}")
    print(f"before: {load_line()}")

    # Settings: (K, tail draws S, encoding, sampling seed); the chosen one is re-drawn with more seeds.
    settings = [(k, s, enc, 0) for k in ks for s in (0, default_tail_samples(k, vocab)) for enc in args.encodings]
    settings += [chosen + (seed,) for seed in range(1, args.seeds)]
    if chosen + (0,) not in settings:
        settings.append(chosen + (0,))
    tmp = tempfile.TemporaryDirectory()
    writers = {st: TopKCacheWriter(Path(tmp.name) / "-".join(map(str, st)), top_k=st[0], tail_samples=st[1],
                                   encoding=st[2], sample_seed=st[3], teacher_provenance=teacher.provenance,
                                   tokenizer_digest=digest, max_length=args.max_length, examples_per_shard=256)
               for st in settings}

    # Per example: both models' logits at the loss positions, the full KL, and every setting's cache rows.
    start = time.perf_counter()
    per_example, full_sum, n_total = [], 0.0, 0
    tail_mass = {}  # (K, S) -> summed tail mass of the K - S top entries
    for ex in examples:
        keep = torch.tensor(ex.tokens.labels[1:]) != -100
        targets = torch.tensor(ex.tokens.input_ids[1:])[keep]
        t_logits = loss_position_logits(teacher.model, ex.tokens.input_ids, keep)
        s_logits = loss_position_logits(student.model, ex.tokens.input_ids, keep)
        n = targets.numel()
        full = forward_kl(s_logits, t_logits, targets).item()
        rows = {}
        for k, s, enc, seed in settings:
            if (k, s, seed) not in rows:
                rows[k, s, seed] = topk_with_tail_draws(t_logits, k=k, tail_samples=s,
                                                        uniforms=tail_uniforms(ex.key, n, s, seed))
                if seed == 0:
                    lp = rows[k, s, seed][1][:, : k - s]
                    tail_mass[k, s] = tail_mass.get((k, s), 0.0) + (-torch.expm1(torch.logsumexp(lp, -1))).sum().item()
            writers[k, s, enc, seed].add(ex.key, *rows[k, s, seed])
        del t_logits, rows
        per_example.append((ex.key, s_logits, targets, full))
        full_sum += full * n
        n_total += n
    full_kl = full_sum / n_total
    reference_seconds = time.perf_counter() - start

    results = {}
    for st, w in writers.items():
        w.close()
        cache = TopKCache(w.out_dir)
        cached_sum, worst = 0.0, 0.0
        for key, s_logits, targets, full in per_example:
            c_ids, c_lps = cache.get(key)
            kl = forward_kl_topk(s_logits, c_ids, c_lps, targets, **cache.loss_kwargs()).item()
            cached_sum += kl * targets.numel()
            worst = max(worst, abs(kl - full) / full)
        cached_kl = cached_sum / n_total
        disk = sum(f.stat().st_size for f in w.out_dir.iterdir())
        results[st] = {"k": st[0], "tail_samples": st[1], "encoding": st[2], "seed": st[3],
                       "bytes_per_token": cache.meta["bytes_per_token"], "disk_bytes_per_token": disk / n_total,
                       "mean_tail_mass": tail_mass[st[0], st[1]] / n_total, "cached_kl": cached_kl, "full_kl": full_kl,
                       "rel_error": (cached_kl - full_kl) / full_kl, "worst_example_rel_error": worst}
    tmp.cleanup()
    for r in results.values():
        r["meets_target"] = r["bytes_per_token"] <= MAX_BYTES and abs(r["rel_error"]) <= MAX_REL_ERROR

    table = []
    for (k, s, enc, seed), r in results.items():
        if seed:
            continue
        table.append({"K": k, "columns": f"{k - s} top + {s} draws" if s else f"{k} top + bucket", "encoding": enc,
                      "B/token": f"{r['bytes_per_token']} ({r['disk_bytes_per_token']:.1f})",
                      "top tail mass": f"{r['mean_tail_mass']:.2e}", "KL cached": f"{r['cached_kl']:.5f}",
                      "KL full": f"{full_kl:.5f}", "rel. error": f"{r['rel_error']:+.3%}",
                      "worst ex.": f"{r['worst_example_rel_error']:.2%}",
                      "<=200 B, <=1%": "yes" if r["meets_target"] else "no",
                      "chosen": "<==" if (k, s, enc) == chosen else ""})
    print()
    print_table(table, list(table[0]))
    print(f"\n{n_total:,} response tokens; reference forwards, full KL and cache rows took {reference_seconds:.0f} s")

    best = results[chosen + (0,)]
    errors = [r["rel_error"] for st, r in results.items() if st[:3] == chosen]
    spread = (f"over {len(errors)} sampling seeds: mean {statistics.mean(errors):+.3%}, "
              f"sd {statistics.stdev(errors):.3%}, max |error| {max(map(abs, errors)):.3%}" if len(errors) > 1 else "")
    print(f"chosen: K={chosen[0]} ({chosen[0] - chosen[1]} top + {chosen[1]} tail draws), {chosen[2]}: "
          f"{best['bytes_per_token']} B/token (<= {MAX_BYTES}: {'met' if best['bytes_per_token'] <= MAX_BYTES else 'MISSED'}), "
          f"relative KL error {best['rel_error']:+.3%} (<= {MAX_REL_ERROR:.0%}: "
          f"{'met' if max(map(abs, errors)) <= MAX_REL_ERROR else 'MISSED'}); {spread}")

    pipeline = None
    if args.pipeline:
        del teacher, student  # the pipeline loads its own teacher; the student logits are kept above
        with tempfile.TemporaryDirectory() as tmp_dir:
            cfg = CacheTeacherConfig(teacher=TEACHER, data=data, top_k=chosen[0], max_length=args.max_length,
                                     models=ModelOptions(device="cpu"), out=Path(tmp_dir) / "cache")
            summary = run_cache_teacher(cfg)
            cache = TopKCache(cfg.out)
            cached_sum = 0.0
            for key, s_logits, targets, _ in per_example:
                c_ids, c_lps = cache.get(key)
                cached_sum += forward_kl_topk(s_logits, c_ids, c_lps, targets, **cache.loss_kwargs()).item() * targets.numel()
            rel = (cached_sum / n_total - full_kl) / full_kl
        pipeline = {"summary": summary, "rel_error": rel}
        print(f"run_cache_teacher (K={chosen[0]}, batched): {summary['examples']} examples, {summary['tokens']:,} tokens, "
              f"{summary['tail_samples']} tail draws, {summary['bytes_per_token']} B/token on disk, {summary['seconds']} s "
              f"({summary['teacher_tokens_per_s']} teacher tok/s); KL relative error {rel:+.3%} "
              f"(the table's seed-0 cache: {best['rel_error']:+.3%})")
    load_after = load_line()
    print(f"after: {load_after}")

    if args.json:
        args.json.write_text(json.dumps({"teacher": TEACHER, "student": STUDENT, "examples": len(examples),
                                         "response_tokens": n_total, "max_length": args.max_length,
                                         "chosen": list(chosen), "results": list(results.values()),
                                         "pipeline": pipeline, "machine": machine_line(), "load_after": load_after},
                                        indent=2))


if __name__ == "__main__":
    main()
