import copy
import hashlib
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny import tiny_tokenizer

from teacherfit.data import (
    IGNORE_INDEX,
    PLAIN_CHAT_TEMPLATE,
    DataError,
    Record,
    chat_template_for,
    has_chat_template,
    load_records,
    record_id,
    render_prompt,
    tokenize_example,
    tokenize_prompt,
    tokenize_response_alone,
    tokenize_text,
    write_records,
)

# One example, written in each of the three formats; all must read to EXPECTED.
SYSTEM, INSTRUCTION, INPUT, OUTPUT = "Be brief.", "Name a colour.", "Pick a warm one.", "Red."
EXPECTED_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour.\n\nPick a warm one."},
    {"role": "assistant", "content": "Red."},
]
PROVENANCE = {"teacher": "tiny-teacher", "decoding": {"temperature": 0.0, "max_new_tokens": 8}}

ROWS = {
    "alpaca": {
        "instruction": INSTRUCTION, "input": INPUT, "output": OUTPUT, "system": SYSTEM, "id": "ex-1", **PROVENANCE
    },
    "sharegpt": {
        "conversations": [
            {"from": "system", "value": SYSTEM},
            {"from": "human", "value": f"{INSTRUCTION}\n\n{INPUT}"},
            {"from": "gpt", "value": OUTPUT},
        ],
        "id": "ex-1",
        **PROVENANCE,
    },
    "messages": {"messages": EXPECTED_MESSAGES, "id": "ex-1", **PROVENANCE},
}
SECOND_ROWS = {  # a different prompt, with no system turn and no alpaca input
    "alpaca": {"instruction": "What is the capital of France?", "output": "Paris."},
    "sharegpt": {
        "conversations": [
            {"from": "user", "value": "What is the capital of France?"},
            {"from": "assistant", "value": "Paris."},
        ]
    },
    "messages": {
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ]
    },
}
SECOND_MESSAGES = SECOND_ROWS["messages"]["messages"]

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Blue."},
]
SHAREGPT_SPEAKER = {"system": "system", "user": "human", "assistant": "gpt"}


def write_rows(path, rows):
    """Write raw rows the way other tools do: JSONL lines, a JSON array, or a Parquet table."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "messages"])
def test_each_format_and_file_type_reads_to_the_same_records(tmp_path, fmt, suffix):
    path = write_rows(tmp_path / f"data{suffix}", [ROWS[fmt], SECOND_ROWS[fmt]])
    report = load_records(path)

    assert report.format == fmt
    assert report.n_rows == 2
    first = Record(
        id=record_id(EXPECTED_MESSAGES[:2]),
        messages=EXPECTED_MESSAGES,
        meta={"teacher": "tiny-teacher", "decoding": {"temperature": 0.0, "max_new_tokens": 8}, "source_id": "ex-1"},
    )
    second = Record(id=record_id(SECOND_MESSAGES[:1]), messages=SECOND_MESSAGES)
    assert report.records == [first, second]
    where = ":1" if suffix == ".jsonl" else ":#0"
    assert report.records[0].source == f"{path}{where}"
    assert report.records[1].source == f"{path}{':2' if suffix == '.jsonl' else ':#1'}"
    assert report.malformed == [] and report.duplicate_ids == [] and report.empty_responses == []


def test_ids_are_stable_across_formats_and_files_and_differ_between_prompts(tmp_path):
    ids = set()
    for fmt in ROWS:
        for suffix in (".jsonl", ".json", ".parquet"):
            ids.add(load_records(write_rows(tmp_path / f"{fmt}{suffix}", [ROWS[fmt]])).records[0].id)
    assert len(ids) == 1
    assert record_id(EXPECTED_MESSAGES[:2]) != record_id(SECOND_MESSAGES[:1])
    # the id depends on the prompt only: another response to the same prompt keeps it
    assert Record.from_messages(EXPECTED_MESSAGES[:2] + [{"role": "assistant", "content": "Orange."}]).id in ids


def test_record_id_is_sha256_of_canonical_json():
    prompt = [{"content": "héllo", "role": "user", "name": "ignored"}]
    canonical = '[{"content":"héllo","role":"user"}]'
    assert record_id(prompt) == hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
    assert len(record_id(prompt)) == 16


def test_alpaca_input_is_joined_only_when_non_empty(tmp_path):
    path = write_rows(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Translate.", "input": "good morning", "output": "bonjour"},
            {"instruction": "Say hi.", "input": "", "output": "hi"},
            {"instruction": "Say bye.", "input": None},
        ],
    )
    records = load_records(path).records
    assert [r.messages for r in records] == [
        [{"role": "user", "content": "Translate.\n\ngood morning"}, {"role": "assistant", "content": "bonjour"}],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
        [{"role": "user", "content": "Say bye."}],
    ]
    assert records[2].response is None and records[2].prompt == records[2].messages


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_multi_turn_sharegpt_and_messages_are_kept_whole(tmp_path, suffix):
    sharegpt = {"conversations": [{"from": SHAREGPT_SPEAKER[m["role"]], "value": m["content"]} for m in MULTI_TURN]}
    for fmt, row in (("sharegpt", sharegpt), ("messages", {"messages": MULTI_TURN})):
        record = load_records(write_rows(tmp_path / f"{fmt}{suffix}", [row])).records[0]
        assert record.messages == MULTI_TURN
        assert record.prompt == MULTI_TURN[:4]
        assert record.response == "Blue."
        assert record.id == record_id(MULTI_TURN[:4])


def test_messages_content_parts_are_joined(tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Line one."}, {"type": "text", "text": "Line two."}]},
            {"role": "assistant", "content": "ok"},
        ]
    }
    record = load_records(write_rows(tmp_path / "parts.jsonl", [row])).records[0]
    assert record.messages[0] == {"role": "user", "content": "Line one.\nLine two."}


def test_json_object_with_data_list(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": [ROWS["alpaca"]], "version": 1}))
    assert load_records(path).records[0].messages == EXPECTED_MESSAGES


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_to_row_round_trip(tmp_path, suffix):
    records = [
        Record.from_messages(EXPECTED_MESSAGES, meta={**PROVENANCE, "source_id": "ex-1", "finish_reason": "stop"}),
        Record.from_messages(MULTI_TURN, meta={"teacher": "other", "score": 1.5, "tags": ["a", "b"]}),
        Record.from_messages(SECOND_MESSAGES[:1]),
    ]
    row = records[0].to_row()
    assert list(row)[:2] == ["id", "messages"] and row["teacher"] == "tiny-teacher"

    path = write_records(tmp_path / f"out{suffix}", records)
    report = load_records(path)
    assert report.format == "messages"
    assert report.records == records
    expected_sources = [f"{path}:1", f"{path}:2", f"{path}:3"] if suffix == ".jsonl" else [
        f"{path}:#0", f"{path}:#1", f"{path}:#2"
    ]
    assert [r.source for r in report.records] == expected_sources
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out{suffix}"]  # no temp files left


def test_with_response_keeps_id_and_updates_meta():
    record = Record.from_messages(SECOND_MESSAGES[:1], meta={"teacher": "a"})
    answered = record.with_response("Paris.", teacher="b", finish_reason="stop")
    assert answered.id == record.id
    assert answered.messages == SECOND_MESSAGES
    assert answered.meta == {"teacher": "b", "finish_reason": "stop"}
    assert record.meta == {"teacher": "a"} and record.messages == SECOND_MESSAGES[:1]
    # replacing an existing response keeps the prompt
    assert answered.with_response("Lyon?").messages[-1] == {"role": "assistant", "content": "Lyon?"}
    assert answered.with_response("Lyon?").prompt == SECOND_MESSAGES[:1]


# --------------------------------------------------------------------------------------- malformed rows


def mixed_jsonl(tmp_path):
    lines = [
        json.dumps({"instruction": "Say hi.", "output": "hi"}),
        '{"instruction": "broken',
        "",
        json.dumps({"output": "no instruction"}),
        json.dumps({"instruction": "Say bye.", "output": "bye"}),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_row_stops_with_file_and_line(tmp_path):
    path = mixed_jsonl(tmp_path)
    with pytest.raises(DataError) as err:
        load_records(path)
    message = str(err.value)
    assert message.startswith(f"{path}:2: invalid JSON")
    assert "set on_error: skip" in message and "--set on_error=skip" in message
    assert err.value.path == str(path) and err.value.line == 2


def test_skip_counts_malformed_rows(tmp_path):
    path = mixed_jsonl(tmp_path)
    report = load_records(path, on_error="skip")
    assert report.n_rows == 4  # the blank line is not a row
    assert [r.response for r in report.records] == ["hi", "bye"]
    assert [loc for loc, _ in report.malformed] == [f"{path}:2", f"{path}:4"]
    assert "missing 'instruction'" in report.malformed[1][1]
    assert report.summary() == (
        "mixed.jsonl: 4 rows (alpaca) -> 2 records; 2 malformed skipped, 0 duplicate ids, 0 empty responses"
    )
    assert report.to_dict()["malformed"][0]["location"] == f"{path}:2"


@pytest.mark.parametrize(
    "row, reason",
    [
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]},
            "messages[1]: unknown role 'tool'",
        ),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}, "no user turn"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string, got int"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]: only text"),
        ({"messages": "hi"}, "missing 'messages' list"),
        ({"conversations": []}, "missing 'messages' list"),  # the file's format is fixed by its first row
        (["not", "an", "object"], "row must be a JSON object, got list"),
    ],
)
def test_malformed_reasons_name_the_json_index(tmp_path, row, reason):
    path = write_rows(tmp_path / "bad.json", [ROWS["messages"], row])
    with pytest.raises(DataError, match=re.escape(f"bad.json:#1: {reason}")) as err:
        load_records(path)
    assert err.value.index == 1
    skipped = load_records(path, on_error="skip")
    assert len(skipped.records) == 1
    assert [loc for loc, _ in skipped.malformed] == [f"{path}:#1"]
    assert skipped.malformed[0][1].startswith(reason)


def test_sharegpt_unknown_speaker_and_undetectable_first_row(tmp_path):
    turns = [{"from": "human", "value": "hi"}, {"from": "robot", "value": "beep"}]
    path = write_rows(tmp_path / "s.jsonl", [ROWS["sharegpt"], {"conversations": turns}])
    with pytest.raises(DataError, match=re.escape("s.jsonl:2: conversations[1]: unknown speaker 'robot'")):
        load_records(path)

    path = write_rows(tmp_path / "u.jsonl", [{"text": "hello"}, ROWS["sharegpt"]])
    with pytest.raises(DataError, match="u.jsonl:1: cannot tell the format"):
        load_records(path)
    report = load_records(path, on_error="skip")  # detection moves on to the first usable row
    assert report.format == "sharegpt" and [r.messages for r in report.records] == [EXPECTED_MESSAGES]

    (tmp_path / "none.jsonl").write_text("[1]\n")
    assert load_records(tmp_path / "none.jsonl", on_error="skip", allow_empty=True).format == "unknown"


def test_duplicates_keep_first_and_empty_responses_are_kept(tmp_path):
    path = write_rows(
        tmp_path / "dups.jsonl",
        [
            {"instruction": "Say hi.", "output": "hi"},
            {"instruction": "Say hi.", "output": "hello"},
            {"instruction": "Say bye.", "output": "  "},
            {"instruction": "Say hi.", "output": "hey"},
        ],
    )
    report = load_records(path)
    hi, bye = record_id([{"role": "user", "content": "Say hi."}]), record_id([{"role": "user", "content": "Say bye."}])
    assert [r.id for r in report.records] == [hi, bye]
    assert report.records[0].response == "hi"
    assert report.duplicate_ids == [hi, hi]
    assert report.empty_responses == [bye]
    assert report.records[1].response == "  "
    assert report.summary() == (
        "dups.jsonl: 4 rows (alpaca) -> 2 records; 0 malformed skipped, 2 duplicate ids, 1 empty response"
    )


def test_require_response_and_limit(tmp_path):
    path = write_rows(
        tmp_path / "r.jsonl",
        [
            {"instruction": "A", "output": "a"},
            {"instruction": "B"},
            {"instruction": "C", "output": ""},
            {"instruction": "D"},
        ],
    )
    with pytest.raises(DataError, match="r.jsonl:2: no response"):
        load_records(path, require_response=True)
    report = load_records(path, require_response=True, on_error="skip")
    assert [r.response for r in report.records] == ["a", ""]  # empty is not malformed
    assert [loc for loc, _ in report.malformed] == [f"{path}:2", f"{path}:4"]

    limited = load_records(path, limit=2)
    assert [r.prompt[0]["content"] for r in limited.records] == ["A", "B"] and limited.n_rows == 2


def test_explicit_format_overrides_detection(tmp_path):
    path = write_rows(tmp_path / "a.jsonl", [ROWS["alpaca"]])
    with pytest.raises(DataError, match="a.jsonl:1: missing 'conversations' list"):
        load_records(path, format="sharegpt")


def test_unsupported_suffix_and_empty_file(tmp_path):
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'; supported: \.jsonl, \.json, \.parquet"):
        load_records(tmp_path / "x.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        load_records(tmp_path / "empty.jsonl")


# --------------------------------------------------------------------------------- rendering and labels

CHAT = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red and blue."}]


def labelled_text(tokenizer, example):
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def test_labels_cover_only_the_assistant_turn(tokenizer):
    example = tokenize_example(tokenizer, CHAT)
    full = tokenizer(render_prompt(tokenizer, CHAT, add_generation_prompt=False), add_special_tokens=False)["input_ids"]
    prompt = tokenize_prompt(tokenizer, CHAT[:1])

    assert example.input_ids == full
    assert labelled_text(tokenizer, example) == "Red and blue.<|im_end|>\n"
    assert example.n_prompt_tokens == len(prompt)
    assert example.input_ids[: len(prompt)] == prompt
    assert example.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert example.labels[len(prompt) :] == example.input_ids[len(prompt) :]
    assert example.n_response_tokens == len(full) - len(prompt)
    assert not example.truncated


def test_multi_turn_last_vs_all(tokenizer):
    last = tokenize_example(tokenizer, MULTI_TURN, label_turns="last")
    every = tokenize_example(tokenizer, MULTI_TURN, label_turns="all")
    assert last.input_ids == every.input_ids
    assert labelled_text(tokenizer, last) == "Blue.<|im_end|>\n"
    assert labelled_text(tokenizer, every) == "Red.<|im_end|>\nBlue.<|im_end|>\n"
    assert every.n_prompt_tokens == len(tokenize_prompt(tokenizer, MULTI_TURN[:2]))
    assert last.n_prompt_tokens == len(tokenize_prompt(tokenizer, MULTI_TURN[:4]))
    # the second user turn sits between the labelled turns and is not labelled
    second_user = tokenizer("<|im_start|>user\nAnother one?<|im_end|>\n", add_special_tokens=False)["input_ids"]
    start = every.input_ids.index(second_user[0], every.n_prompt_tokens)
    assert every.labels[start : start + len(second_user)] == [IGNORE_INDEX] * len(second_user)
    with pytest.raises(ValueError, match="label_turns"):
        tokenize_example(tokenizer, MULTI_TURN, label_turns="first")
    with pytest.raises(ValueError, match="no assistant turn"):
        tokenize_example(tokenizer, MULTI_TURN[:2])


def test_base_tokenizer_uses_plain_template(base_tokenizer, tokenizer):
    assert not has_chat_template(base_tokenizer) and has_chat_template(tokenizer)
    assert chat_template_for(base_tokenizer) == (PLAIN_CHAT_TEMPLATE, True)
    assert chat_template_for(tokenizer) == (tokenizer.chat_template, False)
    assert render_prompt(base_tokenizer, MULTI_TURN[:4]) == (
        "### System:\nBe brief.\n\n### User:\nName a colour.\n\n### Assistant:\nRed.<|im_end|>\n\n"
        "### User:\nAnother one?\n\n### Assistant:\n"
    )
    example = tokenize_example(base_tokenizer, CHAT)
    assert labelled_text(base_tokenizer, example) == "Red and blue.<|im_end|>\n\n"
    prompt_text = base_tokenizer.decode(example.input_ids[: example.n_prompt_tokens])
    assert prompt_text == "### User:\nName a colour.\n\n### Assistant:\n"


def test_truncation_keeps_labels_aligned(tokenizer):
    full = tokenize_example(tokenizer, CHAT)
    cut = full.n_prompt_tokens + 2
    inside_response = tokenize_example(tokenizer, CHAT, max_length=cut)
    assert inside_response.truncated
    assert inside_response.input_ids == full.input_ids[:cut]
    assert inside_response.labels == full.labels[:cut]
    assert inside_response.n_response_tokens == 2

    inside_prompt = tokenize_example(tokenizer, CHAT, max_length=full.n_prompt_tokens - 1)
    assert inside_prompt.truncated and inside_prompt.n_response_tokens == 0
    assert set(inside_prompt.labels) == {IGNORE_INDEX}
    assert not tokenize_example(tokenizer, CHAT, max_length=len(full.input_ids)).truncated


def test_fallback_when_template_is_not_prefix_stable():
    # the generation prompt says "assistant" but a rendered assistant turn says "model": not prefix-stable
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<|im_start|>' + role + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    example = tokenize_example(tokenizer, CHAT)
    prompt = tokenize_prompt(tokenizer, CHAT[:1])
    content = tokenizer("Red and blue.", add_special_tokens=False)["input_ids"]
    assert example.input_ids == prompt + content + [tokenizer.eos_token_id]
    assert example.labels == [IGNORE_INDEX] * len(prompt) + content + [tokenizer.eos_token_id]
    assert labelled_text(tokenizer, example) == "Red and blue.<|im_end|>"
    with pytest.raises(ValueError, match="not prefix-stable"):
        tokenize_example(tokenizer, MULTI_TURN, label_turns="all")


def test_tokenize_prompt_ends_with_generation_prompt(tokenizer):
    ids = tokenize_prompt(tokenizer, CHAT[:1])
    assert tokenizer.decode(ids) == "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    assert tokenize_prompt(tokenizer, CHAT[:1], max_length=4) == ids[-4:]


def test_tokenize_text_labels_text_and_eos(tokenizer):
    example = tokenize_text(tokenizer, "Red and blue.")
    content = tokenizer("Red and blue.", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    # the tiny tokenizer has no BOS: EOS opens the sequence, unlabelled, so that the first word is scored too
    assert example.input_ids == [eos] + content + [eos]
    assert example.labels == [IGNORE_INDEX] + content + [eos]
    assert (example.n_prompt_tokens, example.n_response_tokens) == (1, len(content) + 1)
    short = tokenize_text(tokenizer, "Red and blue.", max_length=3)
    assert short.truncated and short.input_ids == [eos] + content[:2] and short.labels == [IGNORE_INDEX] + content[:2]


def _with_bos(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    return tokenizer


@pytest.mark.parametrize("template", [True, False], ids=["chat-template", "plain-template"])
@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos"])
@pytest.mark.parametrize("chat", [CHAT, MULTI_TURN], ids=["one-turn", "multi-turn"])
def test_response_alone_scores_exactly_the_conditional_response_tokens(tokenizer, base_tokenizer, template, bos, chat):
    """IFD's two passes (PPL(A | Q) and PPL(A)) must score the same token ids, whatever the template and BOS."""
    tok = tokenizer if template else base_tokenizer
    tok = _with_bos(tok) if bos else tok
    cond = tokenize_example(tok, chat)
    alone = tokenize_response_alone(tok, cond)

    def scored(ex):  # position 0 is never scored: it has nothing to be predicted from
        return [label for label in ex.labels[1:] if label != IGNORE_INDEX]

    assert scored(alone) == scored(cond) == [t for t in cond.labels if t != IGNORE_INDEX]
    # the response alone: one start token (BOS, else EOS), then the conditional pass's response ids
    start = tok.bos_token_id if bos else tok.eos_token_id
    assert alone.input_ids == [start] + scored(cond) and alone.labels[0] == IGNORE_INDEX
    assert tok.decode(scored(alone)).startswith(chat[-1]["content"])
    # what tokenize_text scores for the same response is not that: EOS instead of the template's end of turn
    assert scored(tokenize_text(tok, chat[-1]["content"])) != scored(cond)


# ---- Hugging Face `datasets`: save_to_disk folders, Arrow files, hub ids (offline here)

CHATS = [
    {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
    for i in range(5)
]


def test_save_to_disk_folder_and_arrow_file_read_as_the_same_records(tmp_path):
    from datasets import Dataset, DatasetDict

    jsonl = tmp_path / "chats.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in CHATS))
    want = [(r.id, r.messages) for r in load_records(jsonl).records]
    ds = Dataset.from_list(CHATS)
    ds.save_to_disk(str(tmp_path / "saved"))
    assert [(r.id, r.messages) for r in load_records(tmp_path / "saved").records] == want
    DatasetDict({"train": ds.select(range(3)), "test": ds.select(range(3, 5))}).save_to_disk(str(tmp_path / "dd"))
    test = load_records(f"{tmp_path / 'dd'}?split=test")
    assert [(r.id, r.messages) for r in test.records] == want[3:] and test.format == "messages"
    with pytest.raises(DataError, match=r"has splits train, test; name one, e\.g\. .*dd\?split=train"):
        load_records(tmp_path / "dd")
    with pytest.raises(DataError, match="no split 'dev'; it has train, test"):
        load_records(f"{tmp_path / 'dd'}?split=dev")
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert [(r.id, r.messages) for r in load_records(arrow).records] == want


def test_dataset_row_errors_name_the_dataset_and_row_index(tmp_path):
    from datasets import Dataset

    rows = [{"instruction": "ok", "output": "fine"}, {"instruction": "", "output": "no instruction"}]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'bad'}#1: ")):
        load_records(tmp_path / "bad")
    skipped = load_records(tmp_path / "bad", on_error="skip")
    assert len(skipped.records) == 1 and skipped.malformed[0][0] == f"{tmp_path / 'bad'}#1"


def test_a_folder_that_is_not_a_saved_dataset_is_refused(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one written by `datasets`' save_to_disk"):
        load_records(tmp_path / "plain")


def test_hub_ids_are_told_apart_from_paths(tmp_path, monkeypatch):
    from teacherfit.data import is_hub_id, parse_source

    monkeypatch.chdir(tmp_path)
    assert is_hub_id("HuggingFaceH4/ultrachat_200k") and is_hub_id("tatsu-lab/alpaca?split=train&revision=main")
    assert not is_hub_id("data/prompts.jsonl") and not is_hub_id("./x") and not is_hub_id("/abs/x")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    assert not is_hub_id("org/name")  # an existing folder wins
    assert parse_source("a/b?split=train_sft&subset=default&revision=abc") == (
        Path("a/b"), {"split": "train_sft", "subset": "default", "revision": "abc"})
    with pytest.raises(DataError, match="unknown dataset option 'splt'"):
        parse_source("a/b?splt=train")


def test_hub_dataset_goes_through_load_dataset_and_offline_says_what_to_do(monkeypatch):
    """Offline here (HF_HUB_OFFLINE=1): the hub path reaches datasets.load_dataset with the id, subset, split and
    revision the user gave, and its failure becomes one line naming the dataset and what to do."""
    import datasets

    calls = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    with pytest.raises(DataError) as err:
        load_records("HuggingFaceH4/ultrachat_200k?split=train_sft&subset=default&revision=main")
    assert calls == [(("HuggingFaceH4/ultrachat_200k", "default"), {"split": "train_sft", "revision": "main"})]
    message = str(err.value)
    assert message.startswith("HuggingFaceH4/ultrachat_200k?split=train_sft&subset=default&revision=main: cannot load")
    assert "HF_HUB_OFFLINE" in message and "\n" not in message


def test_config_keeps_hub_ids_and_resolves_paths_relative_to_the_file(tmp_path):
    from teacherfit.config import GenerateConfig, load_config

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "local.jsonl").write_text(json.dumps(CHATS[0]) + "\n")
    cfg_file = tmp_path / "conf" / "g.yaml"
    cfg_file.write_text("instructions: HuggingFaceH4/ultrachat_200k?split=train_sft\nteachers: [{name: a, model: m}]\n")
    assert str(load_config(GenerateConfig, cfg_file).instructions) == "HuggingFaceH4/ultrachat_200k?split=train_sft"
    cfg_file.write_text("instructions: local.jsonl\nteachers: [{name: a, model: m}]\nout: runs/gen\n")
    cfg = load_config(GenerateConfig, cfg_file)
    assert cfg.instructions == (tmp_path / "conf" / "local.jsonl").resolve()
    assert cfg.out == (tmp_path / "conf" / "runs" / "gen").resolve()  # an output folder is never a Hub id
