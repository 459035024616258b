"""GPU check for ranking at scale: bf16 scoring, a classifier reward model, and `rank` sharded across processes.

Random-initialised real architectures (nothing downloaded: the device machines reach no hub): a student with
Qwen2.5-0.5B's shapes (V = 151,936), GPT-2 (124M) as the reference LM, and a sequence-classification reward model
with Qwen2.5-0.5B's shapes. Three teachers' response sets of ``--rows`` rows each are ranked through the product's
own CLI, once as one process and once as two processes sharing the machine's GPU(s) (``torchrun``), and the two
results are compared score by score. Prints a table and writes ``gpu_check_rank.json`` (to ``$OUT`` when set).

    python benchmarks/gpu_check_rank.py                 # a CUDA machine: bf16, about 2-4 minutes
    python benchmarks/gpu_check_rank.py --small --rows 24   # any machine: tiny shapes, fp32 on the CPU (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' real byte-level BPE tokenizer, trained in milliseconds

WORDS = ("the sea and the sky", "a neural network learns from data", "def add(a, b): return a + b",
         "bonjour means good morning", "red, green and blue", "Paris is the capital of France")


def build_models(root: Path, small: bool) -> dict[str, Path]:
    from tiny import tiny_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    qwen = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=512) if small else
            dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936))
    common = dict(max_position_embeddings=4096, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  tie_word_embeddings=True)
    gpt2 = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=512) if small else dict(vocab_size=50257)
    models = {
        "student": Qwen2ForCausalLM(Qwen2Config(**qwen, **common)),
        "reference": GPT2LMHeadModel(GPT2Config(**gpt2, n_positions=1024, pad_token_id=tok.pad_token_id)),
        "reward": Qwen2ForSequenceClassification(Qwen2Config(**qwen, **common, num_labels=1)),
    }
    paths = {}
    for name, model in models.items():
        paths[name] = root / name
        model.save_pretrained(paths[name], safe_serialization=True)
        tok.save_pretrained(paths[name])
    return paths


def write_sets(root: Path, rows: int) -> list[dict]:
    sets = []
    for t, (name, scale) in enumerate((("short", 1), ("medium", 4), ("long", 12))):
        path = root / f"{name}.jsonl"
        with open(path, "w") as fh:
            for i in range(rows):
                answer = " ".join(WORDS[(i + k + t) % len(WORDS)] for k in range(scale + i % 5)) + "."
                fh.write(json.dumps({"instruction": f"Tell me about {WORDS[i % len(WORDS)]} ({i}).",
                                     "output": answer}) + "\n")
        sets.append({"name": name, "path": str(path)})
    return sets


def rank(cmd: list[str], cfg: dict, path: Path) -> float:
    path.write_text(yaml.safe_dump(cfg))
    start = time.perf_counter()
    proc = subprocess.run(cmd + ["rank", "-c", str(path)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"rank failed ({' '.join(cmd)}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return seconds


def per_sample(run_dir: Path) -> dict[tuple[str, str], dict]:
    import pyarrow.parquet as pq

    rows = pq.read_table(run_dir / "per_sample.parquet").to_pylist()
    return {(r["teacher"], r["id"]): r for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512, help="responses per teacher (3 teachers)")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a smoke run on any machine)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    out = Path(os.environ.get("OUT", "."))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        paths = build_models(root, args.small)
        sets = write_sets(root, args.rows)
        build_s = time.perf_counter() - t0
        cfg = {"responses": sets, "student": str(paths["student"]), "reference_lm": str(paths["reference"]),
               "reward": {"kind": "classifier", "model": str(paths["reward"]), "max_length": 1024},
               "max_length": 1024, "max_tokens": 16384 if cuda else 4096, "bootstrap": 100,
               "models": {"dtype": "bfloat16" if cuda else "float32", "device": "auto"}}
        one = rank([sys.executable, "-m", "teacherfit"], {**cfg, "out": str(root / "one")}, root / "one.yaml")
        two = rank([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "teacherfit"],
                   {**cfg, "out": str(root / "two")}, root / "two.yaml")
        a, b = per_sample(root / "one"), per_sample(root / "two")
        assert a.keys() == b.keys(), "the sharded run scored other rows"
        fields = ("loss_student", "reward", "ppl_ref", "ifd_student", "car")
        diffs = {f: max(abs(a[k][f] - b[k][f]) for k in a if a[k][f] == a[k][f]) for f in fields}
        teachers = json.loads((root / "one" / "teachers.json").read_text())
        order_two = [t["teacher"] for t in json.loads((root / "two" / "teachers.json").read_text())]
    result = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpus": torch.cuda.device_count(), "torch": torch.__version__, "small": args.small,
        "rows": 3 * args.rows, "dtype": cfg["models"]["dtype"], "build_s": round(build_s, 1),
        "rank_1_process_s": round(one, 1), "rank_2_processes_s": round(two, 1),
        "max_abs_diff_1_vs_2_processes": diffs,
        "same_order": [t["teacher"] for t in teachers] == order_two,
        "teachers": [{k: t[k] for k in ("teacher", "car", "reward", "loss_student")} for t in teachers],
    }
    print(json.dumps(result, indent=2))
    (out / "gpu_check_rank.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
