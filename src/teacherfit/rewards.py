"""Reward scores r for (instruction, response) records (backends layer).

Three sources behind one protocol, ``RewardModel.score(records) -> list[float]``:

- ``ClassifierReward``: a sequence-classification reward model loaded with transformers (Skywork-Reward,
  ArmoRM-style: the conversation rendered with the RM's own chat template, the first logit is the score).
- ``LocalJudgeReward``: any local causal LM used as a judge. One forward pass per record gives the
  probability-weighted 1-10 rating: the judge prompt ends with ``Rating: `` and we read the next-token
  distribution over the rating tokens. For tokenizers that split "10" into "1","0" we teacher-force the
  path "10" in the same pass: P(10) = P("1") P("0"|"1") and P(1) = P("1") (1 - P("0"|"1")).
- ``OpenAIJudgeReward``: the same prompt sent to an OpenAI-compatible endpoint; uses the returned
  top log-probabilities when the server gives them, else parses the integer from the text. Unparseable
  answers are counted (``self.unparsed``) and scored NaN, never 0.
"""

from __future__ import annotations

import math
import re
import threading
from typing import Any, Callable, Protocol, Sequence

import torch

from teacherfit.data import Record, chat_template_for, render_prompt
from teacherfit.scoring import context_of, lm_head_logits, pad_to_width, padded_batches

JUDGE_PROMPT_VERSION = "teacherfit-judge-v1"
JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of an AI assistant's answer."
JUDGE_USER = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant "
    "to the user question displayed below. Consider helpfulness, relevance, accuracy, depth and level of "
    "detail. Rate the response on a scale of 1 to 10, where 1 is useless and 10 is excellent.\n\n"
    "[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]\n\n"
    "Reply with the rating only, a number from 1 to 10."
)
JUDGE_ANSWER_PREFIX = "Rating: "
RATINGS = tuple(range(1, 11))
_JUDGE_HEAD_TOKENS = 8  # tokens kept from the start of a truncated judge prompt (the system prompt's start)


class RewardModel(Protocol):
    def provenance(self) -> dict[str, Any]: ...

    def score(self, records: Sequence[Record], on_batch: Callable[[int, int], None] | None = None) -> list[float]: ...


def _question_text(record: Record) -> str:
    """The conversation up to the response, as text for the judge (multi-turn kept, roles named)."""
    prompt = [m for m in record.prompt if m["role"] != "system"]
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def judge_messages(record: Record, *, max_chars: int = 6000) -> list[dict[str, str]]:
    """The documented judge prompt (version ``JUDGE_PROMPT_VERSION``) for one record."""
    answer = record.response or ""
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": JUDGE_USER.format(question=_question_text(record)[:max_chars], answer=answer[:max_chars])},
    ]


def expected_rating(probs: dict[int, float]) -> float:
    """Probability-weighted rating, renormalised over the ratings 1..10."""
    total = sum(probs.values())
    if total <= 0:
        return float("nan")
    return sum(r * p for r, p in probs.items()) / total


class LocalJudgeReward:
    """A local causal LM as judge: probability-weighted 1-10 rating from a single forward pass."""

    def __init__(self, loaded, *, max_length: int = 1024, max_tokens: int = 4096):
        self.loaded = loaded
        self.max_length = max_length
        self.max_tokens = max_tokens
        tok = loaded.tokenizer
        self.used_plain_template = chat_template_for(tok)[1]
        self.prefix_ids = tok(JUDGE_ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
        self.paths = self._rating_paths(tok)
        shortest = len(self.prefix_ids) + 2 + _JUDGE_HEAD_TOKENS + 1
        if max_length < shortest:  # else the truncation in `encode` cannot keep the rating instruction
            raise ValueError(f"judge max_length={max_length} is too small for this tokenizer: it must hold the "
                             f"start of the judge prompt, its end and {JUDGE_ANSWER_PREFIX!r}; use >= {shortest}")

    @staticmethod
    def _rating_paths(tok) -> dict[int, list[int]]:
        """Token ids of each rating after the answer prefix (how the tokenizer splits "Rating: 10")."""
        base = tok(JUDGE_ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
        paths = {}
        for r in RATINGS:
            ids = tok(JUDGE_ANSWER_PREFIX + str(r), add_special_tokens=False)["input_ids"]
            if ids[: len(base)] != base:
                raise ValueError(f"judge tokenizer merges the rating into the prefix {JUDGE_ANSWER_PREFIX!r}")
            paths[r] = ids[len(base) :]
        singles = [p for p in paths.values() if len(p) == 1]
        long = [p for p in paths.values() if len(p) > 1]
        if len(singles) < 9 or len(long) > 1 or (long and long[0][:1] != paths[1][:1]) or (long and len(long[0]) != 2):
            raise ValueError("judge tokenizer: ratings 1-9 must be single tokens and 10 either one token or '1'+'0'")
        return paths

    def provenance(self) -> dict[str, Any]:
        return dict(self.loaded.provenance, reward="judge", prompt=JUDGE_PROMPT_VERSION,
                    plain_template=self.used_plain_template)

    def encode(self, record: Record) -> list[int]:
        tok = self.loaded.tokenizer
        text = render_prompt(tok, judge_messages(record), add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        budget = self.max_length - len(self.prefix_ids) - 2
        if len(ids) > budget:  # keep the end: the rating instruction comes last
            ids = ids[:_JUDGE_HEAD_TOKENS] + ids[len(ids) - (budget - _JUDGE_HEAD_TOKENS) :]
        forced = self.paths[10] if len(self.paths[10]) == 2 else []
        return ids + self.prefix_ids + forced[:1]

    @torch.inference_mode()
    def score(self, records, on_batch=None) -> list[float]:
        model, tok = self.loaded.model, self.loaded.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        encoded = [self.encode(r) for r in records]
        two_step = len(self.paths[10]) == 2
        first = {r: p[0] for r, p in self.paths.items()}
        out: list[float] = [math.nan] * len(records)
        lengths = [len(e) for e in encoded]
        for width, batch in padded_batches(lengths, max_tokens=self.max_tokens, max_batch=32, cap=context_of(model)):
            ids, mask = pad_to_width([encoded[i] for i in batch], pad, width)
            hidden = model.get_decoder()(
                input_ids=ids.to(self.loaded.device), attention_mask=mask.to(self.loaded.device), use_cache=False
            ).last_hidden_state
            # only the last two positions matter: no full-vocabulary logits for the whole batch
            rows = torch.arange(len(batch))
            last = torch.tensor([lengths[i] - 1 for i in batch])
            pairs = torch.stack([hidden[rows, last - 1], hidden[rows, last]], 1)
            # the head on each record's two positions alone: BLAS computes a product of a few rows with other
            # kernels than one of many (2e-5 apart in a logit), and a rating must not depend on its batch
            logits = torch.stack([lm_head_logits(model, pair) for pair in pairs]).float()
            for row, i in enumerate(batch):
                # the rating's first token is predicted at the last prefix position
                p_first = torch.softmax(logits[row, 0 if two_step else 1], -1)
                probs = {r: float(p_first[first[r]]) for r in RATINGS if r != 10 or not two_step}
                if two_step:
                    p_zero = float(torch.softmax(logits[row, 1], -1)[self.paths[10][1]])
                    probs[10] = probs[1] * p_zero
                    probs[1] = probs[1] * (1 - p_zero)
                out[i] = expected_rating(probs)
            if on_batch:
                on_batch(len(batch), int(mask.sum()))
        return out


class ClassifierReward:
    """A sequence-classification reward model (first logit = reward)."""

    def __init__(self, loaded, *, max_length: int = 4096, max_tokens: int = 8192):
        self.loaded = loaded
        self.max_length = max_length
        self.max_tokens = max_tokens

    def provenance(self) -> dict[str, Any]:
        return dict(self.loaded.provenance, reward="classifier")

    @torch.inference_mode()
    def score(self, records, on_batch=None) -> list[float]:
        model, tok = self.loaded.model, self.loaded.tokenizer
        texts = [render_prompt(tok, r.messages, add_generation_prompt=False) for r in records]
        encoded = [tok(t, add_special_tokens=False, truncation=True, max_length=self.max_length)["input_ids"] for t in texts]
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        if model.config.pad_token_id is None:
            model.config.pad_token_id = pad  # sequence classifiers find the last real token by the pad id
        out: list[float] = [math.nan] * len(records)
        lengths = [len(e) for e in encoded]
        for width, batch in padded_batches(lengths, max_tokens=self.max_tokens, max_batch=32, cap=context_of(model)):
            ids, mask = pad_to_width([encoded[i] for i in batch], pad, width)
            logits = model(input_ids=ids.to(self.loaded.device), attention_mask=mask.to(self.loaded.device)).logits
            for row, i in enumerate(batch):
                out[i] = float(logits[row, 0])
            if on_batch:
                on_batch(len(batch), int(mask.sum()))
        return out


_RATING_RE = re.compile(r"(?<!\d)(10|[1-9])(?!\d)")


def parse_rating(text: str) -> float | None:
    """The first integer 1-10 in a judge's answer ("Rating: 7", "[[8]]", "7/10"); None if there is none."""
    match = _RATING_RE.search(text)
    return float(match.group(1)) if match else None


def rating_from_logprobs(content: list[dict[str, Any]]) -> float | None:
    """Probability-weighted rating from a chat completion's per-token ``logprobs.content``; None if no rating.

    The distribution is read at the token where ``parse_rating`` finds the rating in the generated text
    ("Rating: 7" puts it at the fourth token; digits among the alternatives of other tokens are not
    ratings). None when there is no rating or its token also holds other characters.
    When the server's tokenizer splits "10" into "1","0" and the judge chose "1", the next position gives
    P("0"|"1") and P("1") is shared as in ``LocalJudgeReward``: P(10) = P("1") P("0"|"1"),
    P(1) = P("1") (1 - P("0"|"1")). After another chosen rating, P("1") counts as 1 (its continuation is
    unknown).
    """
    tokens = [position.get("token") or "" for position in content]
    match = _RATING_RE.search("".join(tokens))
    if match is None:
        return None
    offset = 0
    for k, token in enumerate(tokens):
        if offset + len(token) > match.start():
            break
        offset += len(token)
    chosen = tokens[k].strip()
    if chosen not in (match.group(1), match.group(1)[:1]):
        return None
    probs: dict[int, float] = {}
    for entry in content[k].get("top_logprobs") or []:
        token = entry["token"].strip()
        if token.isdigit() and 1 <= int(token) <= 10:
            probs[int(token)] = probs.get(int(token), 0.0) + math.exp(entry["logprob"])
    if chosen == "1" and 1 in probs and k + 1 < len(content):
        p_zero = sum(math.exp(e["logprob"]) for e in content[k + 1].get("top_logprobs") or [] if e["token"] == "0")
        probs[10] = probs.get(10, 0.0) + probs[1] * p_zero
        probs[1] *= 1 - p_zero
    return expected_rating(probs) if probs else None


class OpenAIJudgeReward:
    """A judge behind an OpenAI-compatible endpoint (GPT-4-class judges, or a local vLLM/llama.cpp server)."""

    def __init__(self, remote_cfg):
        from teacherfit.remote import make_client

        self.cfg = remote_cfg
        self.client = make_client(remote_cfg)
        self.unparsed = 0
        self._lock = threading.Lock()  # `unparsed` is counted from the worker threads

    def provenance(self) -> dict[str, Any]:
        return {"reward": "openai_judge", **self.cfg.identity(),
                "prompt": JUDGE_PROMPT_VERSION}

    def _one(self, record: Record) -> float:
        from teacherfit.remote import chat_completion

        messages = judge_messages(record)
        # room for "Rating: 10" split into digits, so that the rating is never cut off
        try:
            resp = chat_completion(self.client, self.cfg, messages, max_tokens=8, temperature=0.0, top_p=1.0,
                                   seed=0, logprobs=20)
        except Exception:  # servers that refuse logprobs: ask again without them
            resp = chat_completion(self.client, self.cfg, messages, max_tokens=8, temperature=0.0, top_p=1.0, seed=0)
        choice = resp["choices"][0]
        rating = rating_from_logprobs((choice.get("logprobs") or {}).get("content") or [])
        if rating is None:
            rating = parse_rating(choice["message"]["content"] or "")
        if rating is None:
            with self._lock:
                self.unparsed += 1
            return math.nan
        return rating

    def score(self, records, on_batch=None) -> list[float]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=self.cfg.concurrency * len(self.cfg.urls)) as pool:  # per server
            out = []
            for value in pool.map(self._one, records):
                out.append(value)
                if on_batch:
                    on_batch(1, 0)
        return out


def make_reward(cfg, models_opts) -> RewardModel:
    """Build the reward source a ``RewardConfig`` describes."""
    from teacherfit.models import load_model

    if cfg.kind == "openai_judge":
        if cfg.remote is None:
            raise ValueError("reward.kind 'openai_judge' needs reward.remote (base_url, model)")
        return OpenAIJudgeReward(cfg.remote)
    if cfg.model is None:
        raise ValueError(f"reward.kind {cfg.kind!r} needs reward.model")
    task = "seq_cls" if cfg.kind == "classifier" else "causal_lm"
    loaded = load_model(cfg.model, device=models_opts.device, dtype=models_opts.dtype,
                        trust_remote_code=models_opts.trust_remote_code, task=task, device_map=cfg.device_map)
    if cfg.kind == "classifier":
        return ClassifierReward(loaded, max_length=cfg.max_length, max_tokens=cfg.max_tokens)
    return LocalJudgeReward(loaded, max_length=cfg.max_length, max_tokens=cfg.max_tokens)
