"""GPU check for ranking at scale: bf16 scoring, a classifier reward model, and `rank` sharded across processes.

Random-initialised real architectures (nothing downloaded: the device machines reach no hub): a student with
Qwen2.5-0.5B's shapes (V = 151,936), GPT-2 (124M) as the reference LM, and a sequence-classification reward model
with Qwen2.5-0.5B's shapes. Three teachers' response sets of ``--rows`` rows each are ranked through the product's
own CLI, once as one process and once as two processes sharing the machine's GPU(s) (``torchrun``), and the two
results are compared score by score, GRACE (issue 13) included: its per-example gradient sketches are computed on the
GPU in bf16 and the teachers' GRACE scores compared between the two runs. A second check projects the same
examples' gradients with ``scoring.GradientSketch`` on the CPU in fp32 and on the GPU in fp32 and bf16, and reports
how far the GPU's sketches are from the CPU's. Prints a table and writes ``gpu_check_rank.json`` (to ``$OUT`` when
set).

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

# the --small shapes (a smoke run on any machine) of every Qwen2-architecture model built here
SMALL_QWEN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512)
WORDS = ("the sea and the sky", "a neural network learns from data", "def add(a, b): return a + b",
         "bonjour means good morning", "red, green and blue", "Paris is the capital of France")


def build_models(root: Path, small: bool) -> dict[str, Path]:
    from tiny import tiny_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    qwen = (dict(SMALL_QWEN) if small else
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
        log = Path(os.environ.get("OUT", ".")) / f"{path.stem}-failed.log"
        log.write_text(proc.stdout + "\n" + proc.stderr)  # every process's traceback (the tail may hold only one)
        sys.exit(f"rank failed ({' '.join(cmd)}), whole output in {log}:\n{proc.stderr[-4000:]}")
    return seconds


def per_sample(run_dir: Path) -> dict[tuple[str, str], dict]:
    import pyarrow.parquet as pq

    rows = pq.read_table(run_dir / "per_sample.parquet").to_pylist()
    return {(r["teacher"], r["id"]): r for r in rows}


def sketch_agreement(small: bool, examples: int = 8) -> dict:
    """The same examples' projected gradients (GRACE's input) on the CPU in fp32 and on the GPU in fp32 and bf16."""
    from tiny import tiny_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from teacherfit.scoring import GradientSketch

    tok = tiny_tokenizer()
    shape = (dict(SMALL_QWEN) if small else
             dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=32768))
    torch.manual_seed(1)
    base = Qwen2ForCausalLM(Qwen2Config(**shape, max_position_embeddings=1024, tie_word_embeddings=True,
                                        pad_token_id=tok.pad_token_id)).eval()
    rows = []
    for i in range(examples):
        prompt = tok(f"Tell me about {WORDS[i % len(WORDS)]}.")["input_ids"]
        answer = tok(" ".join(WORDS[(i + k) % len(WORDS)] for k in range(3 + i)))["input_ids"]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    devices = [("cpu", torch.float32)]
    if torch.cuda.is_available():
        devices += [("cuda", torch.float32), ("cuda", torch.bfloat16)]
    sketches = {}
    for device, dtype in devices:
        model = Qwen2ForCausalLM(base.config).eval()
        model.load_state_dict(base.state_dict())
        model.to(device=device, dtype=dtype)
        sketch = GradientSketch(model, dim=512, seed=0)
        start = time.perf_counter()
        sketches[f"{device}-{str(dtype).split('.')[-1]}"] = (
            torch.tensor([sketch.project(ids, lab) for ids, lab in rows], dtype=torch.float64),
            time.perf_counter() - start)
    reference, _ = sketches["cpu-float32"]
    out = {"weights": sum(p.numel() for p in base.parameters()), "examples": examples, "dim": 512}
    for name, (value, seconds) in sketches.items():
        cos = torch.nn.functional.cosine_similarity(value, reference, dim=1)
        rel = (value - reference).norm(dim=1) / reference.norm(dim=1)
        out[name] = {"seconds": round(seconds, 2), "min_cosine_vs_cpu": round(float(cos.min()), 6),
                     "max_rel_err_vs_cpu": float(rel.max())}
    return out


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
        teachers_two = json.loads((root / "two" / "teachers.json").read_text())
        order_two = [t["teacher"] for t in teachers_two]
        grace_two = {t["teacher"]: t["grace"] for t in teachers_two}
        grace_rel = max(abs(t["grace"] - grace_two[t["teacher"]]) / abs(t["grace"]) for t in teachers)
        grace_order = sorted(grace_two, key=grace_two.get) == [t["teacher"] for t in
                                                               sorted(teachers, key=lambda t: t["grace"])]
        sketch = sketch_agreement(args.small)
    result = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpus": torch.cuda.device_count(), "torch": torch.__version__, "small": args.small,
        "rows": 3 * args.rows, "dtype": cfg["models"]["dtype"], "build_s": round(build_s, 1),
        "rank_1_process_s": round(one, 1), "rank_2_processes_s": round(two, 1),
        "max_abs_diff_1_vs_2_processes": diffs,
        "same_order": [t["teacher"] for t in teachers] == order_two,
        "grace_max_rel_diff_1_vs_2_processes": grace_rel, "grace_same_order": grace_order,
        "teachers": [{k: t[k] for k in ("teacher", "car", "reward", "loss_student", "grape", "grace")}
                     for t in teachers],
        "gradient_sketch_cpu_vs_gpu": sketch,
    }
    print(json.dumps(result, indent=2))
    (out / "gpu_check_rank.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
