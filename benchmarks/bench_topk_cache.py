"""Teacher top-k cache: bytes per token against forward-KL accuracy, over K and stored dtypes.

The offline cache (`teacherfit cache-teacher`) keeps the teacher's K most likely next tokens per response
position instead of its full distribution. This benchmark measures what that costs in accuracy on the
packaged teacher/student pair (teacher qwen2.5-coder-1.5b-instruct, student qwen2.5-coder-0.5b-instruct,
same tokenizer) and real data (the first ``--examples`` of the teacher's own quickstart responses, tokenized
by ``tokenize_records`` at ``--max-length``):

  - reference: the full-vocabulary forward KL(teacher || student), ``losses.forward_kl``, mean over all
    response tokens, from both models' full logits at the loss positions (one example at a time, no
    padding);
  - for every K and stored encoding: the teacher's top-K written through ``TopKCacheWriter``, read back
    through ``TopKCache``, and ``losses.forward_kl_topk`` (tail="bucket", the default) against the same
    student logits. Relative error = |cached - full| / full. Bytes/token is the stored payload
    (``meta["bytes_per_token"]``) and, in brackets, the bytes of the files on disk per token.

Target: at most 200 bytes per token with at most 1% relative error; the chosen setting (the writer's
default encoding at K = the config's default top_k) is marked. Then ``run_cache_teacher`` itself runs
with the chosen setting on the same examples (batched, padded) and must agree with the table.

    python benchmarks/bench_topk_cache.py                  # 8 examples, max length 384 (~3-4 minutes)
    python benchmarks/bench_topk_cache.py --examples 20 --ks 16 32
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import load_line, machine_line, print_table
from teacherfit.config import CacheTeacherConfig, ModelOptions, ResponseSetConfig, TrainData
from teacherfit.distill.cache import DEFAULT_ENCODING, ENCODINGS, TopKCache, TopKCacheWriter, tokenizer_digest
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
CHOSEN = (CacheTeacherConfig.model_fields["top_k"].default, DEFAULT_ENCODING)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=8, help="first N quickstart responses (default: %(default)s)")
    ap.add_argument("--max-length", type=int, default=384, help="tokens per example (default: %(default)s)")
    ap.add_argument("--ks", type=int, nargs="+", default=[8, 16, 24, 32, 64], help="K values (default: %(default)s)")
    ap.add_argument("--encodings", nargs="+", default=list(ENCODINGS), choices=list(ENCODINGS),
                    help="stored encodings (default: all)")
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
    ks = sorted(set(args.ks) | {CHOSEN[0]})
    data = TrainData(responses=[ResponseSetConfig(name=TEACHER, path=RESPONSES)], limit=args.examples)
    teacher, student = load_model(TEACHER, device="cpu"), load_model(STUDENT, device="cpu")
    same_tokenizer = tokenizer_digest(teacher.tokenizer) == tokenizer_digest(student.tokenizer)
    examples, stats = tokenize_records(training_records(data), teacher.tokenizer, args.max_length)

    print(f"teacher: {TEACHER} ({teacher.provenance['sha256'][:12]}), student: {STUDENT} "
          f"({student.provenance['sha256'][:12]}), fp32; tokenizer digests equal: {same_tokenizer}")
    print(f"machine: {machine_line()}")
    print(f"data: {RESPONSES.name}, {len(examples)} examples, max_length {args.max_length}, "
          f"{sum(len(ex.tokens.input_ids) for ex in examples):,} tokens, "
          f"{sum(ex.tokens.n_response_tokens for ex in examples):,} response tokens; {stats}")
    print(f"before: {load_line()}")

    # Full-vocabulary reference, and the teacher's top-max(K) at every loss position, example by example.
    start = time.perf_counter()
    per_example, full_sum, n_total = [], 0.0, 0
    tail_sums = dict.fromkeys(ks, 0.0)
    for ex in examples:
        keep = torch.tensor(ex.tokens.labels[1:]) != -100
        targets = torch.tensor(ex.tokens.input_ids[1:])[keep]
        t_logits = loss_position_logits(teacher.model, ex.tokens.input_ids, keep)
        s_logits = loss_position_logits(student.model, ex.tokens.input_ids, keep)
        n = targets.numel()
        full = forward_kl(s_logits, t_logits, targets).item()
        t_logp = F.log_softmax(t_logits, dim=-1)
        values, ids = t_logp.topk(max(ks), dim=-1)
        for k in ks:
            tail_sums[k] += (-torch.expm1(torch.logsumexp(values[:, :k], dim=-1))).sum().item()
        del t_logits, t_logp
        per_example.append((ex.key, s_logits, targets, ids, values, full))
        full_sum += full * n
        n_total += n
    full_kl = full_sum / n_total
    reference_seconds = time.perf_counter() - start

    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            for enc in args.encodings:
                folder = Path(tmp) / f"k{k}-{enc}"
                with TopKCacheWriter(folder, top_k=k, teacher_provenance=teacher.provenance,
                                     tokenizer_digest=tokenizer_digest(teacher.tokenizer),
                                     max_length=args.max_length, examples_per_shard=256, encoding=enc) as w:
                    for key, _, _, ids, values, _ in per_example:
                        w.add(key, ids[:, :k], values[:, :k])
                disk = sum(f.stat().st_size for f in folder.iterdir())
                cache = TopKCache(folder)
                cached_sum, worst = 0.0, 0.0
                for key, s_logits, targets, _, _, full in per_example:
                    c_ids, c_lps = cache.get(key)
                    kl = forward_kl_topk(s_logits, c_ids, c_lps, targets).item()
                    cached_sum += kl * targets.numel()
                    worst = max(worst, abs(kl - full) / full)
                cached_kl = cached_sum / n_total
                rel = abs(cached_kl - full_kl) / full_kl
                payload = cache.meta["bytes_per_token"]
                ok = payload <= MAX_BYTES and rel <= MAX_REL_ERROR
                chosen = (k, enc) == CHOSEN
                results.append({"k": k, "encoding": enc, "bytes_per_token": payload, "disk_bytes_per_token": disk / n_total,
                                "cached_kl": cached_kl, "full_kl": full_kl, "rel_error": rel, "worst_example_rel_error": worst,
                                "mean_tail_mass": tail_sums[k] / n_total, "meets_target": ok, "chosen": chosen})
                rows.append({"K": k, "encoding": enc, "B/token": f"{payload} ({disk / n_total:.1f})",
                             "tail mass": f"{tail_sums[k] / n_total:.2e}", "KL cached": f"{cached_kl:.5f}",
                             "KL full": f"{full_kl:.5f}", "rel. error": f"{rel:.3%}", "worst ex.": f"{worst:.2%}",
                             "<=200 B, <=1%": "yes" if ok else "no", "chosen": "<==" if chosen else ""})
    print()
    print_table(rows, ["K", "encoding", "B/token", "tail mass", "KL cached", "KL full", "rel. error", "worst ex.",
                       "<=200 B, <=1%", "chosen"])
    print(f"\n{n_total:,} response tokens; reference (two forwards + full KL) took {reference_seconds:.0f} s")
    best = next(r for r in results if r["chosen"])
    print(f"chosen: K={CHOSEN[0]}, {CHOSEN[1]}: {best['bytes_per_token']} B/token (<= {MAX_BYTES}: "
          f"{'met' if best['bytes_per_token'] <= MAX_BYTES else 'MISSED'}), relative KL error {best['rel_error']:.3%} "
          f"(<= {MAX_REL_ERROR:.0%}: {'met' if best['rel_error'] <= MAX_REL_ERROR else 'MISSED'})")

    pipeline = None
    if args.pipeline:
        del teacher, student  # the pipeline loads its own teacher; the student logits are kept above
        with tempfile.TemporaryDirectory() as tmp:
            cfg = CacheTeacherConfig(teacher=TEACHER, data=data, top_k=CHOSEN[0], max_length=args.max_length,
                                     models=ModelOptions(device="cpu"), out=Path(tmp) / "cache")
            summary = run_cache_teacher(cfg)
            cache = TopKCache(cfg.out)
            cached_sum, max_diff, same_ids, cells = 0.0, 0.0, 0, 0
            for key, s_logits, targets, ids, values, _ in per_example:
                c_ids, c_lps = cache.get(key)
                cached_sum += forward_kl_topk(s_logits, c_ids, c_lps, targets).item() * targets.numel()
                max_diff = max(max_diff, (c_lps - values[:, : CHOSEN[0]]).abs().max().item())
                same_ids += (c_ids == ids[:, : CHOSEN[0]]).sum().item()
                cells += c_ids.numel()
            rel = abs(cached_sum / n_total - full_kl) / full_kl
        pipeline = {"summary": summary, "rel_error": rel, "max_logprob_diff": max_diff, "same_ids": same_ids / cells}
        print(f"run_cache_teacher (K={CHOSEN[0]}, batched): {summary['examples']} examples, {summary['tokens']:,} tokens, "
              f"{summary['bytes_per_token']} B/token on disk, {summary['seconds']} s "
              f"({summary['teacher_tokens_per_s']} teacher tok/s); KL relative error {rel:.3%}; "
              f"vs the table's cache: max |logprob diff| {max_diff:.1e}, ids equal {same_ids / cells:.2%}")
    load_after = load_line()
    print(f"after: {load_after}")

    if args.json:
        args.json.write_text(json.dumps({"teacher": TEACHER, "student": STUDENT, "examples": len(examples),
                                         "response_tokens": n_total, "max_length": args.max_length,
                                         "results": results, "pipeline": pipeline, "machine": machine_line(),
                                         "load_after": load_after}, indent=2))


if __name__ == "__main__":
    main()
