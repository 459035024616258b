"""Generation throughput of the transformers backend: batched against one prompt at a time.

``TransformersGenerator`` renders real quickstart prompts (ShareGPT instructions) with the model's chat
template and decodes greedily, once with ``--batch-size`` prompts per ``generate`` call (length-sorted,
left-padded) and once with batch 1, in the same process (the batch-1 run in two halves, before and after
the batched one). Throughput counts generated tokens only: each completion's tokens up to and including
its stop token, never the padding a finished row keeps producing while the rest of its batch runs on.
Both runs are warmed up with a short generation first.

    python benchmarks/bench_generation.py                   # smollm2-135m-instruct, 16 prompts, 64 new tokens
    python benchmarks/bench_generation.py --max-new-tokens 128 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from common import load_line, machine_line, print_table
from teacherfit.data import load_records, tokenize_prompt
from teacherfit.generation import DecodingConfig, TransformersGenerator
from teacherfit.models import load_model
from teacherfit.pipelines.quickstart import ASSETS

INSTRUCTIONS = ASSETS / "instructions.jsonl"
TARGET_SPEEDUP = 4.0


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="packaged model name, GGUF file, HF folder or hub id (default: %(default)s)")
    ap.add_argument("--prompts", type=int, default=16,
                    help="prompts generated for: the 20 quickstart instructions, cycled past 20 (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per generate call when batched (default: %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="most tokens generated per prompt (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="timed rounds of both runs; the fastest of each is kept (default: %(default)s)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    if min(args.prompts, args.batch_size, args.max_new_tokens, args.repeats) < 1:
        ap.error("--prompts, --batch-size, --max-new-tokens and --repeats must be >= 1")
    if args.batch_size == 1:
        ap.error("--batch-size 1 would compare batch 1 with itself; pass a larger batch size")
    return args


def run(generator: TransformersGenerator, prompts, decoding: DecodingConfig) -> tuple[float, list]:
    """Seconds to generate for every prompt, and the completions in prompt order."""
    completions: list = [None] * len(prompts)
    start = time.perf_counter()
    for i, outs in generator.generate(prompts, decoding):
        completions[i] = outs[0]
    return time.perf_counter() - start, completions


def main() -> None:
    args = parse_args()
    lm = load_model(args.model, device="cpu")
    records = load_records(INSTRUCTIONS).records
    prompts = [records[i % len(records)].prompt for i in range(args.prompts)]
    prompt_lengths = [len(tokenize_prompt(lm.tokenizer, p)) for p in prompts]
    decoding = DecodingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0)
    generators = {1: TransformersGenerator(lm, batch_size=1),
                  args.batch_size: TransformersGenerator(lm, batch_size=args.batch_size)}

    print(f"model: {args.model} ({lm.provenance.get('sha256', '')[:12]}), {str(lm.dtype).removeprefix('torch.')}")
    print(f"machine: {machine_line()}")
    print(f"data: {INSTRUCTIONS.name}, {args.prompts} prompts, {sum(prompt_lengths):,} prompt tokens "
          f"({min(prompt_lengths)}-{max(prompt_lengths)} each); greedy, max_new_tokens {args.max_new_tokens}")
    print(f"before: {load_line()}")

    warm = DecodingConfig(max_new_tokens=4, temperature=0.0)
    for size, gen in generators.items():  # warm-up, untimed
        run(gen, prompts[:size], warm)

    # The batch-1 run is split in two halves around the batched run, so that a load change on a shared
    # machine during the benchmark hits both alike instead of only whichever runs second.
    half = len(prompts) // 2
    seconds: dict[int, float] = {}
    completions: dict[int, list] = {}
    for _ in range(args.repeats):
        first, outs_first = run(generators[1], prompts[:half], decoding)
        batched, outs_batched = run(generators[args.batch_size], prompts, decoding)
        second, outs_second = run(generators[1], prompts[half:], decoding)
        for size, took, outs in ((1, first + second, outs_first + outs_second), (args.batch_size, batched, outs_batched)):
            if took < seconds.get(size, math.inf):
                seconds[size], completions[size] = took, outs
    load_after = load_line()

    rows, rate = [], {}
    for size in generators:
        tokens = sum(c.completion_tokens for c in completions[size])
        rate[size] = tokens / seconds[size]
        rows.append({"batch size": size, "prompts": args.prompts, "generated tokens": tokens,
                     "hit max_new_tokens": sum(c.finish_reason == "length" for c in completions[size]),
                     "seconds": seconds[size], "tokens/s": rate[size]})
    print()
    print_table(rows, ["batch size", "prompts", "generated tokens", "hit max_new_tokens", "seconds", "tokens/s"])
    print()
    speedup = rate[args.batch_size] / rate[1]
    print(f"speedup batch {args.batch_size} / batch 1: {speedup:.2f}x  target >= {TARGET_SPEEDUP:.1f}x: "
          f"{'met' if speedup >= TARGET_SPEEDUP else 'MISSED'}")
    same = sum(a.text == b.text for a, b in zip(completions[1], completions[args.batch_size]))
    print(f"greedy completions identical in both runs: {same}/{args.prompts} "
          "(left padding changes fp32 rounding, so a near-tie can flip a token)")
    print(f"after: {load_after}")

    if args.json:
        args.json.write_text(json.dumps({
            "model": args.model, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
            "rows": rows, "speedup": speedup, "identical_completions": same, "machine": machine_line(),
            "load_after": load_after,
        }, indent=2))


if __name__ == "__main__":
    main()
