"""Build the CPU study's data (configs/study-cpu.yaml): 96 ShareGPT instructions with ChatGPT's answers, and every
generated teacher setting's responses to the study's 64 training instructions.

    python scripts/make_study_data.py instructions   # instructions.jsonl + responses/chatgpt.jsonl (seconds)
    python scripts/make_study_data.py generate       # the generated sets (about 45 minutes on 2 CPU cores)

`generate` serves the packaged GGUFs with llama-cpp-python's server on loopback (the ports that
src/teacherfit/assets/study/generate.yaml names; llama.cpp generates 3-4x faster than transformers on this CPU),
runs `teacherfit generate -c src/teacherfit/assets/study/generate.yaml` on the study's training split (the same
seeded split `teacherfit study` makes) and copies each finished set into src/teacherfit/assets/study/responses/.
It resumes where it stopped (runs/study-cpu-generate keeps every finished row).

Selection of instructions (deterministic): as the quickstart's (scripts/make_quickstart_data.py), with ChatGPT
answers of 200-900 characters, 96 taken evenly across the file, none of the quickstart's 20.
"""

import contextlib
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
from make_quickstart_data import (
    BANNED,
    FOLLOW_UPS,
    SOURCE,
    conversations,
    write_sharegpt_sets,
)

from teacherfit.data import load_records

N = 96
ASSETS = ROOT / "src/teacherfit/assets/study"
QUICKSTART = ROOT / "src/teacherfit/assets/quickstart/instructions.jsonl"
STUDY_CONFIG = ROOT / "configs/study-cpu.yaml"
GENERATE_CONFIG = ASSETS / "generate.yaml"
RUN = ROOT / "runs/study-cpu-generate"
SERVED = {"smollm2-135m-instruct": 18101, "qwen2.5-coder-0.5b-instruct": 18102, "qwen2.5-coder-1.5b-instruct": 18103}


def keep(conv) -> bool:
    turns = conv.get("conversations") or []
    if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
        return False
    q, a = turns[0]["value"].strip(), turns[1]["value"].strip()
    ascii_share = sum(c.isascii() for c in q + a) / max(1, len(q + a))
    return (40 <= len(q) <= 300 and 200 <= len(a) <= 900 and ascii_share > 0.99
            and not any(b in q.lower() for b in BANNED) and not q.lower().startswith(FOLLOW_UPS)
            and a[-1] in ".!)\"'")


def instructions() -> None:
    taken = {r.meta.get("source_id") for r in load_records(QUICKSTART).records}
    pool = [c for c in conversations(SOURCE) if keep(c) and c["id"] not in taken]
    seen, unique = set(), []
    for c in pool:  # ShareGPT repeats some questions word for word
        q = c["conversations"][0]["value"].strip().lower()
        if q not in seen:
            seen.add(q)
            unique.append(c)
    step = len(unique) // N
    write_sharegpt_sets([unique[i * step] for i in range(N)], ASSETS)
    print(f"{len(unique)} candidates, wrote {N} instructions and ChatGPT's answers to {ASSETS}")


def generate() -> None:
    from servers import llama_cpp_server  # the tests' loopback launcher

    from teacherfit.config import StudyConfig, load_config
    from teacherfit.models import packaged_gguf_path
    from teacherfit.pipelines.study import split_instructions

    study = load_config(StudyConfig, STUDY_CONFIG)
    split = split_instructions(study, RUN / "split")
    with contextlib.ExitStack() as stack:
        for name, port in SERVED.items():
            stack.enter_context(llama_cpp_server(packaged_gguf_path(name), port=port, n_ctx=2048, threads=2,
                                                 model_alias=name, startup_timeout_s=300))
        subprocess.run([sys.executable, "-m", "teacherfit", "generate", "-c", str(GENERATE_CONFIG),
                        "--instructions", str(split["train"]), "--out", str(RUN)], check=True)
    for path in sorted((RUN / "responses").glob("*.jsonl")):
        if not path.name.endswith(".partial.jsonl"):
            shutil.copyfile(path, ASSETS / "responses" / path.name)
            print(f"copied {path.name}")


if __name__ == "__main__":
    {"instructions": instructions, "generate": generate}[sys.argv[1]]()
