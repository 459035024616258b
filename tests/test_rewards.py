"""Reward sources: the local judge and the classifier against naive references, rating parsing, and the
OpenAI-compatible judge against a real llama.cpp server and against scripted loopback servers."""

from __future__ import annotations

import copy
import json
import math
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Iterator

import pytest
from servers import serve_loopback
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

from teacherfit.config import RewardConfig
from teacherfit.data import Record, render_prompt
from teacherfit.models import LoadedModel
from teacherfit.remote import RemoteConfig
from teacherfit.rewards import (
    JUDGE_ANSWER_PREFIX,
    ClassifierReward,
    LocalJudgeReward,
    OpenAIJudgeReward,
    expected_rating,
    judge_messages,
    make_reward,
    parse_rating,
    rating_from_logprobs,
)
from tiny import CHATML, CORPUS, tiny_llama, tiny_tokenizer

RECORDS = [
    Record.from_messages([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
    for q, a in [
        ("What is 2 + 2?", "4"),
        ("Name a colour.", "Blue is a colour, and so are red and green."),
        ("Write a short poem about the sea.", "The sea is wide,\nthe sky is blue,\nthe fox jumps over the dog."),
        ("Explain how a neural network learns.", "It learns from data step by step. " * 6),
    ]
] + [
    Record.from_messages(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Translate 'good morning' into French."},
            {"role": "assistant", "content": "bonjour"},
            {"role": "user", "content": "And 'good night'?"},
            {"role": "assistant", "content": "bonne nuit"},
        ]
    )
]


def loaded(model, tokenizer) -> LoadedModel:
    return LoadedModel(model=model, tokenizer=tokenizer, provenance={"model": "tiny"},
                       device=torch.device("cpu"), dtype=torch.float32)  # fmt: skip


# --- LocalJudgeReward ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ten_tokenizer():
    """The tiny tokenizer with "10" as one (added) token, so the judge reads P(10) in one step."""
    tok = tiny_tokenizer()
    tok.add_tokens(["10"])
    return tok


@pytest.fixture(scope="module")
def ten_llama(ten_tokenizer):
    return tiny_llama(ten_tokenizer, seed=3)


def naive_expected_rating(model, tok, record: Record) -> float:
    """Each rating's probability by its own full forward pass over the whole judge text, then the mean.

    "1" means the answer "1" and then the end, so when "10" is "1","0" the mass of "1" continued by "0"
    belongs to 10, not to 1.
    """
    prompt = render_prompt(tok, judge_messages(record), add_generation_prompt=True) + JUDGE_ANSWER_PREFIX
    prefix = tok(prompt, add_special_tokens=False)["input_ids"]
    p: dict[int, float] = {}
    rating_tokens: dict[int, list[int]] = {}
    for r in range(1, 11):
        ids = tok(prompt + str(r), add_special_tokens=False)["input_ids"]
        assert ids[: len(prefix)] == prefix
        rating_tokens[r] = ids[len(prefix) :]
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        p[r] = math.exp(sum(float(logp[pos - 1, ids[pos]]) for pos in range(len(prefix), len(ids))))
    if len(rating_tokens[10]) == 2 and rating_tokens[10][:1] == rating_tokens[1]:
        p[1] -= p[10]  # P("1" then end) = P("1") - P("1","0")
    return sum(r * q for r, q in p.items()) / sum(p.values())


def test_tiny_tokenizers_cover_both_paths_for_ten(tokenizer, ten_tokenizer):
    split = LocalJudgeReward._rating_paths(tokenizer)
    assert len(split[10]) == 2 and split[10][0] == split[1][0]
    single = LocalJudgeReward._rating_paths(ten_tokenizer)
    assert single[10] == [ten_tokenizer.convert_tokens_to_ids("10")]
    assert all(len(single[r]) == 1 for r in range(1, 11))


@pytest.mark.parametrize("which", ["ten_split", "ten_single"])
def test_judge_matches_naive_per_rating_forward_passes(which, tokenizer, llama, ten_tokenizer, ten_llama):
    model, tok = (llama, tokenizer) if which == "ten_split" else (ten_llama, ten_tokenizer)
    judge = LocalJudgeReward(loaded(model, tok))
    assert (len(judge.paths[10]) == 2) == (which == "ten_split")
    with torch.inference_mode():
        expected = [naive_expected_rating(model, tok, r) for r in RECORDS]
    assert judge.score(RECORDS) == pytest.approx(expected, abs=1e-5)
    assert all(1.0 <= s <= 10.0 for s in expected)
    assert len(set(round(s, 6) for s in expected)) > 1  # the records really get different scores


def test_judge_with_a_uniform_next_token_distribution_hand_checked(tokenizer, ten_tokenizer, ten_llama, llama):
    """Zero output head: every next token has probability 1/V.

    Split "10": P(r) = 1/V for r = 2..9, P(10) = 1/V^2, P(1) = 1/V - 1/V^2; the mean is 5 + 1/V.
    Single "10": all ten ratings equally likely; the mean is 5.5.
    """
    for model, tok, want in ((llama, tokenizer, 5 + 1 / len(tokenizer)), (ten_llama, ten_tokenizer, 5.5)):
        flat = copy.deepcopy(model)
        torch.nn.init.zeros_(flat.get_output_embeddings().weight)
        assert LocalJudgeReward(loaded(flat, tok)).score(RECORDS[:2]) == pytest.approx([want, want], abs=1e-9)


def test_judge_batching_does_not_change_scores(tokenizer, llama):
    judge = LocalJudgeReward(loaded(llama, tokenizer), max_tokens=1000)
    batches: list[tuple[int, int]] = []
    together = judge.score(RECORDS, on_batch=lambda rows, tokens: batches.append((rows, tokens)))
    alone = [judge.score([r])[0] for r in RECORDS]
    assert len(batches) >= 3 and sum(rows for rows, _ in batches) == len(RECORDS)
    assert sum(tokens for _, tokens in batches) == sum(len(judge.encode(r)) for r in RECORDS)
    assert together == pytest.approx(alone, abs=1e-5)
    assert all(1.0 <= s <= 10.0 for s in together)
    assert judge.score([]) == []


def test_judge_truncates_long_responses_keeping_the_rating_instruction(tokenizer, llama):
    long = RECORDS[0].with_response("The quick brown fox jumps over the lazy dog. " * 80)
    for max_length in (64, 96, 300):
        judge = LocalJudgeReward(loaded(llama, tokenizer), max_length=max_length)
        full = tokenizer(render_prompt(tokenizer, judge_messages(long)), add_special_tokens=False)["input_ids"]
        ids = judge.encode(long)
        assert len(ids) <= max_length < len(full)
        assert ids[:8] == full[:8]  # the start of the system prompt
        # the end: the instruction, the generation prompt, then "Rating: " and the forced "1" of "10"
        tail = ids[: -len(judge.prefix_ids) - 1]
        assert full[-20:] == tail[-20:]
        assert ids[-len(judge.prefix_ids) - 1 :] == judge.prefix_ids + judge.paths[10][:1]
        assert tokenizer.decode(ids).endswith("a number from 1 to 10.<|im_end|>\n<|im_start|>assistant\nRating: 1")
        [score] = judge.score([long])
        assert 1.0 <= score <= 10.0


def test_judge_refuses_a_max_length_too_small_for_the_rating_instruction(tokenizer, llama):
    shortest = len(tokenizer(JUDGE_ANSWER_PREFIX, add_special_tokens=False)["input_ids"]) + 2 + 8 + 1
    with pytest.raises(ValueError, match=f"max_length={shortest - 1} is too small.*use >= {shortest}"):
        LocalJudgeReward(loaded(llama, tokenizer), max_length=shortest - 1)
    judge = LocalJudgeReward(loaded(llama, tokenizer), max_length=shortest)
    ids = judge.encode(RECORDS[0])
    assert len(ids) <= shortest
    assert ids[-len(judge.prefix_ids) - 2 :] == [tokenizer.convert_tokens_to_ids("Ċ")] + judge.prefix_ids + [
        judge.paths[1][0]
    ]


def test_judge_refuses_tokenizers_that_merge_the_rating_with_the_space():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(CORPUS + ["Rating: 7 Rating: 8"] * 20, trainer=trainer)
    merging = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    merging.chat_template = CHATML
    assert merging.convert_ids_to_tokens(merging("Rating: 7", add_special_tokens=False)["input_ids"])[-1] == "Ġ7"
    with pytest.raises(ValueError, match="merges the rating into the prefix"):
        LocalJudgeReward._rating_paths(merging)


# --- ClassifierReward ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier(tokenizer):
    torch.manual_seed(4)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, num_labels=1,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)  # fmt: skip
    return LlamaForSequenceClassification(cfg).eval()


def test_classifier_matches_the_last_token_logit_of_each_example_alone(tokenizer, classifier):
    reward = ClassifierReward(loaded(classifier, tokenizer), max_tokens=200)
    batches: list[int] = []
    together = reward.score(RECORDS, on_batch=lambda rows, tokens: batches.append(rows))
    expected = []
    with torch.inference_mode():
        for record in RECORDS:
            text = render_prompt(tokenizer, record.messages, add_generation_prompt=False)
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            hidden = classifier.model(input_ids=ids).last_hidden_state[0, -1]
            expected.append(float(classifier.score(hidden)[0]))
    assert len(batches) >= 2 and sum(batches) == len(RECORDS)
    assert together == pytest.approx(expected, abs=1e-5)
    assert [reward.score([r])[0] for r in RECORDS] == pytest.approx(together, abs=1e-5)
    assert len(set(round(s, 6) for s in together)) == len(RECORDS)


# --- parse_rating / expected_rating --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, rating",
    [
        ("Rating: 7", 7.0),
        ("[[8]]", 8.0),
        ("10/10", 10.0),
        ("I'd say 3.", 3.0),
        (" 10", 10.0),
        ("Rating: 9 out of 10", 9.0),  # the first rating wins
        ("none", None),
        ("", None),
        ("0", None),
        ("110", None),  # numbers are read whole: 110 is not a rating and holds no rating
        ("2024", None),
        ("11 or 12", None),
    ],
)
def test_parse_rating(text, rating):
    assert parse_rating(text) == rating


def test_expected_rating():
    assert expected_rating({1: 0.5, 10: 0.5}) == 5.5
    assert expected_rating({7: 0.3, 8: 0.1}) == pytest.approx(7.25)  # renormalised over what is there
    assert math.isnan(expected_rating({r: 0.0 for r in range(1, 11)}))
    assert math.isnan(expected_rating({}))


# --- make_reward -------------------------------------------------------------------------------------


def test_make_reward_openai_judge_needs_a_remote():
    with pytest.raises(ValueError, match="'openai_judge' needs `remote`"):  # refused by the config itself
        make_reward(RewardConfig(kind="openai_judge"), None)


# --- OpenAIJudgeReward against a real llama.cpp server ---------------------------------------------------



@pytest.mark.server
@pytest.mark.slow
def test_openai_judge_on_llama_cpp_scores_in_range_or_counts_nan(llama_server):
    judge = OpenAIJudgeReward(RemoteConfig(base_url=llama_server, model="smollm2", concurrency=2))
    calls = []
    scores = judge.score(RECORDS[:3], on_batch=lambda rows, tokens: calls.append(rows))
    assert len(scores) == 3 and calls == [1, 1, 1]
    assert all(math.isnan(s) or 1.0 <= s <= 10.0 for s in scores)
    assert judge.unparsed == sum(math.isnan(s) for s in scores)
    assert judge.provenance()["model"] == "smollm2"


# --- OpenAIJudgeReward against scripted loopback servers -----------------------------------------------


@contextmanager
def scripted_server(reply: Callable[[dict[str, Any]], dict[str, Any]]) -> Iterator[tuple[str, list[dict]]]:
    """A chat completions endpoint on a free loopback port that answers every request with ``reply(body)``."""
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            payload = json.dumps(reply(body)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    with serve_loopback(Handler, seen) as served:
        yield served


def chat_reply(content: str, tokens: list[tuple[str, list[tuple[str, float]]]] | None = None) -> dict[str, Any]:
    """A chat completion whose content is ``content``; ``tokens`` (token, [(alternative, prob)]) become logprobs."""
    logprobs = None
    if tokens is not None:
        logprobs = {"content": [
            {"token": token, "logprob": math.log(dict(top).get(token, 1.0)), "bytes": None,
             "top_logprobs": [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in top]}
            for token, top in tokens
        ]}  # fmt: skip
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop", "logprobs": logprobs}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }  # fmt: skip


def fake_judge(base_url: str) -> OpenAIJudgeReward:
    return OpenAIJudgeReward(RemoteConfig(base_url=base_url, model="fake", timeout_s=5.0, max_retries=0))


def test_openai_judge_unparseable_answer_is_nan_and_counted():
    with scripted_server(lambda body: chat_reply("I cannot rate this")) as (base_url, seen):
        judge = fake_judge(base_url)
        [score] = judge.score(RECORDS[:1])
    assert math.isnan(score) and judge.unparsed == 1
    assert seen[0]["messages"] == judge_messages(RECORDS[0])
    assert seen[0]["logprobs"] is True and seen[0]["top_logprobs"] == 20 and seen[0]["temperature"] == 0.0


def test_openai_judge_text_rating_without_logprobs():
    with scripted_server(lambda body: chat_reply("Rating: 8")) as (base_url, _):
        judge = fake_judge(base_url)
        assert judge.score(RECORDS[:2]) == [8.0, 8.0]
    assert judge.unparsed == 0


def test_openai_judge_weights_ratings_by_top_logprobs():
    reply = chat_reply("7", [("7", [("7", 0.75), ("8", 0.25)])])
    with scripted_server(lambda body: reply) as (base_url, _):
        judge = fake_judge(base_url)
        assert judge.score(RECORDS[:1]) == [pytest.approx(7.25, abs=1e-9)]
    assert judge.unparsed == 0


def test_openai_judge_splits_one_from_ten_when_the_server_splits_digits():
    """The answer "10" from a digit-splitting tokenizer is "1","0": P("1") is shared between 1 and 10
    with P("0"|"1") from the next position, as the local judge does (not all scored as 1)."""
    reply = chat_reply("10", [("1", [("1", 0.9), ("9", 0.1)]), ("0", [("0", 0.8), ("<|im_end|>", 0.2)])])
    with scripted_server(lambda body: reply) as (base_url, _):
        [score] = fake_judge(base_url).score(RECORDS[:1])
    p1, p10, p9 = 0.9 * 0.2, 0.9 * 0.8, 0.1
    assert score == pytest.approx(p1 * 1 + p10 * 10 + p9 * 9, abs=1e-9)


def test_openai_judge_reads_logprobs_where_the_rating_is_not_at_the_first_token():
    """ "Rating: 7": the first token's alternatives hold a stray digit; the rating's own position counts."""
    reply = chat_reply(
        "Rating: 7",
        [("Rating", [("Rating", 0.99), ("5", 0.01)]), (":", [(":", 1.0)]), (" ", [(" ", 1.0)]),
         ("7", [("7", 0.5), ("6", 0.5)])],
    )  # fmt: skip
    with scripted_server(lambda body: reply) as (base_url, _):
        [score] = fake_judge(base_url).score(RECORDS[:1])
    assert score == pytest.approx(6.5, abs=1e-9)


def logprob_content(tokens: list[tuple[str, list[tuple[str, float]]]]) -> list[dict[str, Any]]:
    return chat_reply("".join(t for t, _ in tokens), tokens)["choices"][0]["logprobs"]["content"]


@pytest.mark.parametrize(
    "tokens, rating",
    [
        ([("7", [("7", 0.75), ("8", 0.25)])], 7.25),
        ([(" 7", [(" 7", 0.75), ("8", 0.25)])], 7.25),  # leading spaces are not part of the rating
        ([("10", [("10", 0.5), ("9", 0.5)])], 9.5),  # "10" as one token: no splitting of "1"
        ([("1", [("1", 1.0)]), ("<|im_end|>", [("<|im_end|>", 0.6), ("0", 0.4)])], 0.6 * 1 + 0.4 * 10),
        ([("2", [("2", 0.5), ("1", 0.5)]), ("<|im_end|>", [("0", 1.0)])], 1.5),  # P("1") after "2" stays 1
        ([("2", [("2", 1.0)]), ("0", [("0", 1.0)]), ("2", [("2", 1.0)]), ("4", [("4", 1.0)])], None),  # 2024
        ([("[[8", [("[[8", 0.9), ("[[7", 0.1)]), ("]]", [("]]", 1.0)])], None),  # merged: the text decides
        ([("none", [("none", 0.9), ("5", 0.1)])], None),
        ([], None),
    ],
)
def test_rating_from_logprobs(tokens, rating):
    assert rating_from_logprobs(logprob_content(tokens)) == (None if rating is None else pytest.approx(rating))


def test_openai_judge_falls_back_to_the_text_when_logprobs_hold_no_rating():
    reply = chat_reply("[[8]]", [("[[8", [("[[8", 0.9), ("[[7", 0.1)]), ("]]", [("]]", 1.0)])])
    with scripted_server(lambda body: reply) as (base_url, _):
        judge = fake_judge(base_url)
        assert judge.score(RECORDS[:1]) == [8.0]
    assert judge.unparsed == 0


@pytest.mark.parametrize("model_type,transform", [("granite", {"logits_scaling": 0.25}),
                                                  ("cohere", {"logit_scale": 4.0}),
                                                  ("gemma2", {"final_logit_softcapping": 0.5, "head_dim": 8})])
def test_judge_reads_the_models_own_logits_after_its_head(model_type, transform, tokenizer):
    """Granite divides its logits by logits_scaling, Cohere multiplies them by logit_scale, Gemma 2 soft-caps
    them: the judge's one-pass rating must match per-rating forward passes of the model itself."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(4)
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **transform)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.inference_mode():
        expected = [naive_expected_rating(model, tokenizer, r) for r in RECORDS[:2]]
    assert LocalJudgeReward(loaded(model, tokenizer)).score(RECORDS[:2]) == pytest.approx(expected, abs=1e-5)
