"""Teachers: what the training step asks a teacher for, and the teachers that answer it.

A teacher is called on a micro-batch (``Micro``: padded ids, mask, labels, example keys) and returns a typed
``TeacherSignal``: a list of ``Route``s, each naming the rows of the micro-batch it covers and the
``HeadSignal`` for them. One route over every row is plain distillation; DAE (`align`) routes domain rows to
the expert and the others to the reference model, and ``DistillModule`` runs the head loss once per route. So
`distill` is `align` with a single route, and every teacher below plugs into the same step.

A ``HeadSignal`` carries the teacher's next-token distribution in one of two forms:

- ``hidden`` + ``head`` (+ ``post_head``): the teacher's final hidden states and its output head, applied chunk by
  chunk inside the fused KD loss (no vocabulary-sized tensor for the whole batch);
- ``topk``: (ids, log-probs) per loss position, as the offline cache stores them (or a server returns them).

and, for attention KD, the teacher's captured queries/keys (``attention``). Implementations: ``OnlineTeacher``
(a frozen model beside the student, optionally sharded by FSDP2 / ZeRO-3), ``CachedTeacher`` (the offline top-k
cache), ``StartingWeightsTeacher`` (a LoRA student with its adapters off) and ``RoutedTeacher`` (one teacher per
route). The next ones are the same interface: a teacher scoring the student's own samples (on-policy KD) is
called on micro-batches the student generated; a teacher behind a server fills ``topk`` from the server's prompt
log-probabilities.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

from teacherfit.distill.attention import AttentionCapture
from teacherfit.distill.examples import Micro
from teacherfit.models import decoder_of, output_head
from teacherfit.scoring import PostHead, active_post_head


@dataclass
class HeadSignal:
    """One teacher's targets for some rows of a micro-batch (tensors on the student's device)."""

    hidden: Tensor | None = None  # [rows, T, d] final hidden states, with ``head`` (and ``post_head``)
    head: Callable[[Tensor], Tensor] | None = None
    post_head: PostHead | None = None
    topk: tuple[Tensor, Tensor] | None = None  # ([rows, T-1, k] ids, log-probs) per loss position
    sampled: Tensor | None = None  # [rows, T-1] log p_T of each label token (NaN: not scored); sampled_reverse_kl
    divergence_kwargs: dict[str, float] | None = None  # how these rows are read (a cache's tail draws)
    attention: dict[int, Any] | None = None  # captured q/k per teacher layer, for attention KD


@dataclass
class Route:
    """The rows of a micro-batch one teacher covers (``rows`` None: every row) and its signal for them
    (None: the route has no row in this micro-batch)."""

    name: str
    rows: Tensor | None
    signal: HeadSignal | None


@dataclass
class TeacherSignal:
    routes: list[Route] = field(default_factory=list)


class Teacher(Protocol):
    """The interface the training step calls: a signal per micro-batch; ``close`` releases hooks."""

    def __call__(self, micro: Micro) -> TeacherSignal: ...

    def close(self) -> None: ...


class SingleTeacher:
    """A teacher with one signal for every row; subclasses implement ``head_signal``."""

    name = "teacher"
    collective = False  # its forward takes part in collectives (sharded): every process must call it alike

    def head_signal(self, micro: Micro) -> HeadSignal:
        raise NotImplementedError

    def __call__(self, micro: Micro) -> TeacherSignal:
        return TeacherSignal([Route(self.name, None, self.head_signal(micro))])

    def close(self) -> None:
        pass


def _hidden(model: nn.Module, micro: Micro, device: torch.device) -> Tensor:
    return decoder_of(model)(input_ids=micro.input_ids.to(device),
                             attention_mask=micro.attention_mask.to(device)).last_hidden_state


class OnlineTeacher(SingleTeacher):
    """A frozen model run beside the student (same or another device), in inference mode.

    ``sharded``: its decoder layers were sharded across the processes (FSDP2 / ZeRO-3, ``launch.shard_frozen``);
    each forward then gathers them layer by layer, so every process must call it on every micro-batch."""

    def __init__(self, model: nn.Module, *, vocab: int | None, attn_layers: list[int] | None,
                 device: torch.device, student_device: torch.device, sharded: bool = False):
        self.model = model.eval().requires_grad_(False)
        head = output_head(model, vocab)
        # the KD chunks run where the student's hidden states are: a copy of the head only if devices differ
        self.head = head if device == student_device else copy.deepcopy(head).to(student_device)
        self.post_head = active_post_head(model)  # before the capture hooks: the check runs a forward
        self.device, self.student_device = device, student_device
        self.collective = sharded
        self.capture = AttentionCapture(model, attn_layers) if attn_layers else None
        if self.capture is not None:
            self.capture.__enter__()

    def head_signal(self, micro: Micro) -> HeadSignal:
        if self.capture is not None:
            self.capture.clear()
        with torch.no_grad():
            hidden = _hidden(self.model, micro, self.device)
        attention = None
        if self.capture is not None:
            attention = {k: v._replace(query=v.query.to(self.student_device), key=v.key.to(self.student_device))
                         for k, v in self.capture.captured.items()}
        return HeadSignal(hidden=hidden.to(self.student_device), head=self.head, post_head=self.post_head,
                          attention=attention)

    def close(self) -> None:
        if self.capture is not None:
            self.capture.__exit__(None, None, None)


class AdaptersOff:
    """A LoRA model's output head called with every adapter switched off (the head's own adapter included).

    The KD chunks call the teacher head after the teacher's forward has returned, so a head that carries an
    adapter (``target_modules`` with ``lm_head``) must switch the adapters off itself at each call."""

    def __init__(self, model: nn.Module, head: nn.Module):
        self.model, self.head = model, head

    def __call__(self, hidden: Tensor) -> Tensor:
        with self.model.disable_adapter():
            return self.head(hidden)


class StartingWeightsTeacher(SingleTeacher):
    """The student's own starting weights as a frozen teacher, at no memory cost: a LoRA student with its
    adapters switched off (``peft``'s ``disable_adapter``) is exactly the model it started from.

    For DAE's general reference this keeps, on non-domain samples, what the student already did. The adapters
    are off for the whole teacher: the decoder here and the output head in the KD chunks (``AdaptersOff``).
    """

    def __init__(self, model: nn.Module, *, vocab: int | None, student_device: torch.device):
        if not hasattr(model, "disable_adapter"):
            raise ValueError("the starting-weights teacher needs a LoRA student (set `lora`), or give the model itself")
        self.model, self.student_device = model, student_device
        self.head = AdaptersOff(model, output_head(model, vocab))
        self.post_head = active_post_head(model)

    def head_signal(self, micro: Micro) -> HeadSignal:
        with torch.no_grad(), self.model.disable_adapter():
            hidden = _hidden(self.model, micro, self.student_device)
        return HeadSignal(hidden=hidden.detach(), head=self.head, post_head=self.post_head)


class CachedTeacher(SingleTeacher):
    """The teacher's top-k distributions read from an offline cache (no teacher in memory)."""

    def __init__(self, cache, student_device: torch.device):
        self.cache, self.student_device = cache, student_device
        self.loss_kwargs = cache.loss_kwargs()  # how this cache's rows are read (tail draws), sent with each batch

    def head_signal(self, micro: Micro) -> HeadSignal:
        ids, logprobs = self.cache.collate(micro.keys, micro.labels[:, 1:])
        return HeadSignal(topk=(ids.to(self.student_device), logprobs.to(self.student_device)),
                          divergence_kwargs=self.loss_kwargs or None)


class ServerTeacher(SingleTeacher):
    """A teacher behind an OpenAI-compatible server, scoring the student's token ids through the server's prompt
    log-probabilities (``teacher: {backend: openai, remote, server}``); rows are sent concurrently, with the
    remote backend's bounded concurrency and retries.

    - ``server: vllm``: the ids go as the prompt (``prompt_logprobs: top_k``): the top-k by rank (``topk``, forward KL
      with the cache's tail handling) and the label token's own log-prob (``sampled``).
    - ``server: llama_cpp`` (llama-cpp-python's server, which takes text prompts): the rendered text with ``echo``
      and ``logprobs``, which gives each prompt token's log-prob (``sampled`` only). That server drops the entries
      of tokens equal to BOS and lines them up only when the sequence starts with BOS; and it tokenizes the text
      itself, so each row's ids are checked against its ``/extras/tokenize``: a sampled sequence the tokenizer
      would spell otherwise keeps the teacher's log-probs up to the first difference, the rest are not scored
      (NaN: zero advantage, counted in ``stats['unscored_tokens']``).
    """

    def __init__(self, cfg, tokenizer, *, mode: str, student_device: torch.device):
        from teacherfit.remote import make_client

        cfg.remote.check_key()
        self.cfg, self.tokenizer, self.mode, self.student_device = cfg, tokenizer, mode, student_device
        self.client = make_client(cfg.remote)
        self.stats = {"rows": 0, "unscored_tokens": 0}

    # -------------------------------------------------------------- one sequence

    def _row_vllm(self, ids: list[int]) -> tuple[list[float], list[list[int]], list[list[float]]]:
        from teacherfit.remote import text_completion

        k = self.cfg.top_k
        response = text_completion(self.client, self.cfg.remote, ids, max_tokens=1, temperature=0.0,
                                   extra_body={"prompt_logprobs": k})
        entries = response["choices"][0].get("prompt_logprobs")
        if not isinstance(entries, list) or len(entries) != len(ids):
            raise ValueError(f"{self.cfg.remote.shown_urls()}: no prompt_logprobs for every prompt token in the "
                             "answer: is it a vLLM server (teacher.server: vllm)?")
        own, top_ids, top_lps = [math.nan], [[0] * k], [[-math.inf] * k]
        for t in range(1, len(ids)):
            entry = {int(tok): v for tok, v in (entries[t] or {}).items()}
            own.append(float(entry[ids[t]]["logprob"]) if ids[t] in entry else math.nan)
            best = sorted(entry.items(), key=lambda kv: kv[1].get("rank", 0) or 0)[:k]
            best += [(0, {"logprob": -math.inf})] * (k - len(best))
            top_ids.append([tok for tok, _ in best])
            top_lps.append([float(v["logprob"]) for _, v in best])
        return own, top_ids, top_lps

    def _row_llama_cpp(self, ids: list[int]) -> list[float]:
        from teacherfit.remote import server_tokenize, text_completion

        bos = self.tokenizer.bos_token_id
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        theirs = server_tokenize(self.client, self.cfg.remote, text, server="llama_cpp")
        response = text_completion(self.client, self.cfg.remote, text, max_tokens=1, temperature=0.0, echo=True,
                                   logprobs=1)
        values = iter((response["choices"][0].get("logprobs") or {}).get("token_logprobs") or [])
        same = next((t for t, (a, b) in enumerate(zip(ids, theirs)) if a != b), min(len(ids), len(theirs)))
        own = [math.nan] * len(ids)
        # entries: one per server token after the first, tokens equal to BOS left out; the first is None
        for t in range(1, len(theirs)):
            if theirs[t] == bos:
                continue
            value = next(values, None)
            if t < same and value is not None:
                own[t] = float(value)
        return own

    # -------------------------------------------------------------- the signal

    def head_signal(self, micro: Micro) -> HeadSignal:
        from concurrent.futures import ThreadPoolExecutor

        rows = micro.input_ids.shape[0]
        width = micro.input_ids.shape[1]
        real = [micro.input_ids[b][micro.attention_mask[b].bool()].tolist() for b in range(rows)]
        scorer = self._row_vllm if self.cfg.server == "vllm" else self._row_llama_cpp
        workers = max(1, min(rows, self.cfg.remote.concurrency * len(self.cfg.remote.urls)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            answers = list(pool.map(scorer, real))
        sampled = torch.full((rows, width - 1), math.nan)
        k = self.cfg.top_k
        ids = torch.zeros((rows, width - 1, k), dtype=torch.long) if self.mode == "topk" else None
        lps = torch.full((rows, width - 1, k), -math.inf) if self.mode == "topk" else None
        loss = micro.labels[:, 1:] != -100
        for b, answer in enumerate(answers):
            # right-padded rows: position t of the sequence is predicted at t - 1 of the shifted labels
            own = answer[0] if isinstance(answer, tuple) else answer
            n = len(real[b])
            sampled[b, : n - 1] = torch.tensor(own[1:n], dtype=torch.float32)
            if ids is not None:
                ids[b, : n - 1] = torch.tensor(answer[1][1:n])
                lps[b, : n - 1] = torch.tensor(answer[2][1:n], dtype=torch.float32)
        self.stats["rows"] += rows
        self.stats["unscored_tokens"] += int((loss & sampled.isnan()).sum())
        if self.mode == "topk":
            return HeadSignal(topk=(ids.to(self.student_device), lps.to(self.student_device)))
        return HeadSignal(sampled=sampled.to(self.student_device))


def check_server_tokenizer(cfg, tokenizer, texts: list[str]) -> None:
    """Refuse, before training, a server whose tokenizer is not the student's: it must tokenize the student's
    rendered texts back to the student's ids (the teacher scores the student's tokens)."""
    from teacherfit.remote import make_client, server_tokenize

    cfg.remote.check_key()
    client = make_client(cfg.remote)
    for text in texts:
        ours = tokenizer.encode(text, add_special_tokens=False)
        theirs = server_tokenize(client, cfg.remote, text, server=cfg.server)
        if cfg.server == "llama_cpp" and (not ours or ours[0] != tokenizer.bos_token_id):
            raise ValueError(f"teacher.server llama_cpp: llama-cpp-python's echoed log-probs line up only for "
                             f"sequences that start with BOS, and the student's rendered text does not "
                             f"(first id {ours[:1]}): serve the teacher with vLLM (teacher.server: vllm)")
        if theirs != ours:
            at = next((t for t, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            mine = f"{ours[at]} {tokenizer.decode([ours[at]])!r}" if at < len(ours) else "the end"
            other = str(theirs[at]) if at < len(theirs) else "the end"
            raise ValueError(f"teacher: the server at {cfg.remote.shown_urls()} tokenizes the student's text "
                             f"differently (token {at}: the student has {mine}, the server {other}): the teacher "
                             "behind a server must share the student's tokenizer, since it scores the student's "
                             "token ids")


class RoutedTeacher:
    """DAE's teachers: one per route (e.g. the domain expert and the general reference model), and the route of
    every training example (by key).

    Per micro-batch, each teacher runs on its own rows only (a sub-batch of the same padded width, so positions
    line up with the student's). Teachers are built by their factories on first use, in route order, so a route
    no example takes never loads its model; ``eager`` builds them all at once (several processes: a sharded
    teacher's forward is a collective, so every process builds it and calls it on every micro-batch, on one
    stand-in row when none of its rows take that route).
    """

    def __init__(self, factories: dict[str, Callable[[], SingleTeacher]], route_of: dict[str, str], *,
                 eager: bool = False):
        unknown = set(route_of.values()) - set(factories)
        if unknown:
            raise ValueError(f"examples routed to {sorted(unknown)}, which have no teacher")
        self.factories, self.route_of = factories, route_of
        self.teachers: dict[str, SingleTeacher] = {}
        if eager:
            for name in factories:
                if name in set(route_of.values()):
                    self.teacher(name)

    def teacher(self, name: str) -> SingleTeacher:
        if name not in self.teachers:
            self.teachers[name] = self.factories[name]()
        return self.teachers[name]

    def __call__(self, micro: Micro) -> TeacherSignal:
        routes = []
        for name in self.factories:
            rows = [i for i, key in enumerate(micro.keys) if self.route_of[key] == name]
            index = torch.tensor(rows, dtype=torch.long)
            signal = None
            if rows:
                signal = self.teacher(name).head_signal(micro.select(index))
            elif name in self.teachers and self.teachers[name].collective:
                self.teachers[name].head_signal(micro.select(torch.zeros(1, dtype=torch.long)))  # keep in step
            routes.append(Route(name, index, signal))
        return TeacherSignal(routes)

    def close(self) -> None:
        for teacher in self.teachers.values():
            teacher.close()
