"""Compatibility-scoring throughput: teacherfit's batched scorer against a naive loop and the raw forward pass.

CAR's compatibility term is the mean negative log-likelihood of a teacher's response tokens under the
student. This benchmark scores the quickstart's real ShareGPT prompts with ChatGPT's answers (rendered
with the model's chat template, cycled to ``--examples`` rows) with a real packaged model, and measures
real-token throughput (prompt + response tokens, never padding) of:

  (a) ``score_examples`` with its default settings (length-sorted batches under a token budget, right
      padding, LM head on labelled positions only);
  (b) a naive loop, one example at a time: ``model(input_ids, labels=labels).loss``;
  (c) the raw forward pass, ``model(input_ids)``, over the same real tokens with no padding and no
      attention mask: each of (a)'s batches, its tokens concatenated and re-cut into the same number of
      equal rows (a batch of 12 rows padded to 400 becomes 12 rows of ~310 real tokens);
  (d) reference only, no target: the decoder alone (no LM head) on the same rows as (c).

Why (c) is built this way: it is the same tokens through the same model, in batches of the same size as
the scorer's, with zero padding; rows as long as the batch's mean example keep attention costing about
what it costs in (a). What remains between (a) and (c) is what the scorer adds: padding, the attention
mask, gathering labelled positions and the loss. Running each example alone would also be padding-free
but compares batch 1 with batch ~12 (that is (b)); grouping examples of exactly equal length only works
here because the data are cycled.

The methods run side by side, batch by batch (a, b, c, d on the same examples, then the next batch), so
that load changes on a shared machine hit every method alike; with ``--repeats`` passes, each method's
fastest time on each batch is kept. Each method is warmed up on one batch first.
(a) and (b) must agree on the mean loss to 1e-4 relative (asserted).

    python benchmarks/bench_scoring.py                      # smollm2-135m-instruct, 64 examples
    python benchmarks/bench_scoring.py --model gemma-3-270m --examples 32
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import time
from pathlib import Path

import torch

from common import load_line, machine_line, print_table
from teacherfit.data import TokenizedExample, load_records, tokenize_example
from teacherfit.models import load_model
from teacherfit.pipelines.quickstart import ASSETS
from teacherfit.scoring import length_sorted_batches, score_examples

RESPONSES = ASSETS / "responses" / "chatgpt.jsonl"
SCORER_DEFAULTS = {k: p.default for k, p in inspect.signature(score_examples).parameters.items()
                   if p.default is not inspect.Parameter.empty}
TARGET_VS_RAW = 0.90


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="packaged model name, GGUF file, HF folder or hub id (default: %(default)s)")
    ap.add_argument("--examples", type=int, default=64,
                    help="examples scored: the 20 quickstart answers, cycled (default: %(default)s)")
    ap.add_argument("--max-length", type=int, default=None, help="truncate examples to this many tokens")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help=f"scorer token budget per batch (default: the scorer's, {SCORER_DEFAULTS['max_tokens']})")
    ap.add_argument("--max-batch", type=int, default=None,
                    help=f"scorer rows per batch (default: the scorer's, {SCORER_DEFAULTS['max_batch']})")
    ap.add_argument("--repeats", type=int, default=2,
                    help="timed passes over the batches; each method's fastest time per batch is kept (default: %(default)s)")
    ap.add_argument("--decoder-only", action=argparse.BooleanOptionalAction, default=True,
                    help="also time (d), the decoder without LM head (default: on)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    if args.examples < 1 or args.repeats < 1:
        ap.error("--examples and --repeats must be >= 1")
    return args


def quickstart_examples(tokenizer, n: int, max_length: int | None) -> list[TokenizedExample]:
    """The quickstart's ChatGPT answers, rendered with the model's chat template, cycled to ``n`` examples."""
    records = load_records(RESPONSES, require_response=True).records
    base = [tokenize_example(tokenizer, r.messages, max_length=max_length) for r in records]
    return [base[i % len(base)] for i in range(n)]


def packed_rows(examples: list[TokenizedExample]) -> torch.Tensor:
    """The examples' real tokens, concatenated and re-cut into as many equal rows as there are examples.

    This is the scorer's batch with the padding squeezed out: same rows, same tokens, no mask. The last
    ``< len(examples)`` tokens do not fill a row and are left out (throughput counts the tokens run).
    """
    flat = [t for ex in examples for t in ex.input_ids]
    width = len(flat) // len(examples)
    return torch.tensor(flat[: width * len(examples)]).view(len(examples), width)


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> None:
    args = parse_args()
    lm = load_model(args.model, device="cpu")
    model, tok = lm.model, lm.tokenizer
    decoder = model.get_decoder()
    examples = quickstart_examples(tok, args.examples, args.max_length)
    lengths = [len(ex.input_ids) for ex in examples]
    real = sum(lengths)
    settings = {k: v for k, v in (("max_tokens", args.max_tokens), ("max_batch", args.max_batch)) if v is not None}
    budget = {"max_tokens": SCORER_DEFAULTS["max_tokens"], "max_batch": SCORER_DEFAULTS["max_batch"], **settings}

    # The scorer's own batches. Each is scored by one score_examples call (it fits the budget, so the call
    # runs exactly that batch), and the other methods run on the same examples right after it: load
    # changes on this shared machine then hit every method alike instead of whichever runs last.
    batches = [[examples[i] for i in b] for b in length_sorted_batches(lengths, **budget)]
    packed = [packed_rows(b) for b in batches]
    padded = sum(len(b) * max(len(ex.input_ids) for ex in b) for b in batches)
    run_tokens = sum(p.numel() for p in packed)

    def scorer(batch, _):
        return [s.loss for s in score_examples(model, batch, pad_token_id=tok.pad_token_id, **settings)]

    def naive(batch, _):
        return [model(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels])).loss.item()
                for ex in batch]

    methods = {  # key: (label, function, real tokens it runs)
        "a": ("(a) score_examples", scorer, real),
        "b": ("(b) naive loop, batch 1", naive, real),
        "c": ("(c) raw model(input_ids), unpadded", lambda _, ids: model(input_ids=ids), run_tokens),
    }
    if args.decoder_only:
        methods["d"] = ("(d) decoder only, unpadded", lambda _, ids: decoder(input_ids=ids), run_tokens)

    print(f"model: {args.model} ({lm.provenance.get('sha256', '')[:12]}), {str(lm.dtype).removeprefix('torch.')}")
    print(f"machine: {machine_line()}")
    print(f"data: {RESPONSES.name}, {args.examples} examples (the 20 answers cycled), {real:,} real tokens, "
          f"{sum(ex.n_response_tokens for ex in examples):,} labelled; lengths {min(lengths)}-{max(lengths)}")
    print(f"(a) batches: {budget} -> {len(batches)} batches: " + ", ".join(
        f"{len(b)}x{max(len(ex.input_ids) for ex in b)}" for b in batches))
    print("(c, d) batches: " + ", ".join(f"{p.shape[0]}x{p.shape[1]}" for p in packed)
          + f" ({real - run_tokens} leftover tokens not run)")
    print(f"before: {load_line()}")

    with torch.inference_mode():
        for _, fn, _ in methods.values():  # warm-up, untimed: the first batch of each
            fn(batches[0], packed[0])
        best = [dict.fromkeys(methods, math.inf) for _ in batches]  # fastest time per batch and method
        losses: dict[str, list[float]] = {"a": [], "b": []}
        for repeat in range(args.repeats):
            for b, (batch, ids) in enumerate(zip(batches, packed)):
                for key, (_, fn, _) in methods.items():
                    took, out = timed(fn, batch, ids)
                    best[b][key] = min(best[b][key], took)
                    if key in losses and repeat == 0:
                        losses[key] += out
        seconds = {k: sum(times[k] for times in best) for k in methods}
    load_after = load_line()

    mean_a = sum(losses["a"]) / len(losses["a"])
    mean_b = sum(losses["b"]) / len(losses["b"])
    worst = max(abs(x - y) / abs(y) for x, y in zip(losses["a"], losses["b"]))
    assert abs(mean_a - mean_b) <= 1e-4 * abs(mean_b), f"mean loss differs: scorer {mean_a} vs naive {mean_b}"

    rate = {k: methods[k][2] / s for k, s in seconds.items()}
    pad = {"a": padded - real}
    print()
    print_table(
        [{"method": label, "real tokens": tokens, "pad tokens": pad.get(k, 0), "seconds": seconds[k],
          "tokens/s": rate[k]} for k, (label, _, tokens) in methods.items()],
        ["method", "real tokens", "pad tokens", "seconds", "tokens/s"],
    )
    print()
    a_over_c = rate["a"] / rate["c"]
    print(f"a/c (scorer vs raw forward): {a_over_c:.2f}  target >= {TARGET_VS_RAW:.2f}: "
          f"{'met' if a_over_c >= TARGET_VS_RAW else 'MISSED'}")
    print(f"a/b (scorer vs naive loop):  {rate['a'] / rate['b']:.2f}")
    if "d" in rate:
        print(f"a/d (scorer vs decoder only, reference): {rate['a'] / rate['d']:.2f}")
    print(f"padding waste of (a): {(padded - real) / real:.1%} (padded tokens / real tokens)")
    print(f"mean loss: scorer {mean_a:.6f}, naive {mean_b:.6f}, relative difference "
          f"{abs(mean_a - mean_b) / mean_b:.1e} (worst example {worst:.1e})")
    print(f"after: {load_after}")

    if args.json:
        args.json.write_text(json.dumps({
            "model": args.model, "examples": args.examples, "real_tokens": real, "padded_tokens": padded,
            "scorer_settings": budget, "batches": [list(p.shape) for p in packed], "seconds": seconds,
            "tokens_per_s": rate, "a_over_c": a_over_c, "a_over_b": rate["a"] / rate["b"],
            "mean_loss": {"scorer": mean_a, "naive": mean_b}, "machine": machine_line(), "load_after": load_after,
        }, indent=2))


if __name__ == "__main__":
    main()
