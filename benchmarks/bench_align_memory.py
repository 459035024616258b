"""Peak memory of a DAE (`teacherfit align`) training run with the teachers online or served from the top-k cache.

The quickstart's DAE pair: student Qwen2.5-Coder-0.5B-Instruct (LoRA r 8), expert Qwen2.5-Coder-1.5B-Instruct,
reference Qwen2.5-Coder-0.5B-Instruct (loaded as a model of its own here, so that "both online" really holds
two teachers), on the first N samples of the quickstart's DAE training mix. Both caches are built first with
`teacherfit cache-teacher` (K = 32: 24 top + 8 tail draws). Each configuration then runs in a fresh process
(`teacherfit align ... --set train.max_steps=S`), and the peak resident memory of its training phase (VmHWM,
reset just before the student is loaded, so the held-out scoring and routing are not counted) is read from
its results.json. Run from the repository root:

    python benchmarks/bench_align_memory.py [--samples 8] [--steps 1] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_line, machine_line, print_table

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src/teacherfit/assets/quickstart/dae/train.jsonl"
EXPERT, STUDENT = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"


def teacherfit(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "teacherfit", *args], check=True, cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4, help="first N samples of the DAE training mix")
    ap.add_argument("--steps", type=int, default=1, help="optimizer steps per run (2 x 2 samples each)")
    ap.add_argument("--max-length", type=int, default=320)
    ap.add_argument("--out", type=Path, default=ROOT / "runs/bench-align-memory")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    print(machine_line())
    print(load_line())
    common = [f"--responses=dae={DATA}", "--set", f"data.limit={args.samples}"]
    caches = {}
    for who, model in (("expert", EXPERT), ("reference", STUDENT)):
        caches[who] = args.out / f"cache-{who}"
        teacherfit("cache-teacher", "--teacher", model, *common, "--set", f"max_length={args.max_length}",
                   "--set", "models.device=cpu", "--out", str(caches[who]))
    runs = {
        "both online": ["--expert", EXPERT, "--reference", STUDENT],
        "expert cached, reference online": ["--expert-cache", str(caches["expert"]), "--reference", STUDENT],
        "both cached": ["--expert-cache", str(caches["expert"]), "--reference-cache", str(caches["reference"])],
        "expert cached, reference = student (LoRA off)": ["--expert-cache", str(caches["expert"]), "--reference", "student"],
    }
    rows = []
    for name, teachers in runs.items():
        out = args.out / name.replace(" ", "-").replace(",", "").replace("(", "").replace(")", "").replace("=", "")
        start = time.perf_counter()
        teacherfit("align", "--student", STUDENT, *teachers, *common, "--set", "lora={r: 8, alpha: 16}",
                   "--set", f"train={{batch_size: 2, grad_accum: 2, max_steps: {args.steps}, warmup_steps: 1, "
                            f"max_length: {args.max_length}}}",
                   "--set", "routing.source=flag", "--set", "models.device=cpu", "--no-resume", "--out", str(out))
        res = json.loads((out / "results.json").read_text())
        rows.append({"teachers": name, "in memory": res["memory"]["teachers_in_memory"],
                     "train peak RSS (GiB)": res["memory"]["train_peak_rss_mb"] / 1024,
                     "kd (step 1)": res["first"]["kd"], "wall s": time.perf_counter() - start})
    print(load_line())
    if args.markdown:
        print("| teachers | teacher models in memory | training peak RSS (GiB) | KD at step 1 | wall (s) |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['teachers']} | {r['in memory']} | {r['train peak RSS (GiB)']:.2f} | {r['kd (step 1)']:.4f} | "
                  f"{r['wall s']:.0f} |")
    else:
        print_table(rows, list(rows[0]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
