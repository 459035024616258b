"""On-policy distillation: the student samples its own responses, and the teacher scores them.

``kd.on_policy`` (TRL GKD's ``lmbda``) is the share of each optimizer step's prompts whose responses the student
generates itself, from its live weights; the rest keep the dataset's responses. The step is otherwise the same
step: the generated tokens become the labelled response tokens of an ordinary micro-batch (prompt -100,
generated ids as labels), so every teacher (online, sharded, behind a server, routed per example for DAE) and
every divergence of the fused head runs on them unchanged.

Which prompts and how they are sampled are pure functions of (seed, step, process): the rows are chosen by a
seeded permutation with stochastic rounding (the expected share is exactly ``on_policy``), and each generation
buffer samples under its own seeded RNG (forked, so training's RNG is untouched). A buffer covers
``rollout.buffer_steps`` optimizer steps: at its first step every on-policy prompt of those steps is generated
in one batched call (``rollout.batch_size`` prompts per call at most), from the weights of that step; the next
steps use their share in turn, ``rollout_age`` steps stale (logged). A checkpoint inside a buffer carries the
buffer's rollouts (``rollouts-rank<r>.json``), so a resumed run continues with the very samples the
uninterrupted run used, not samples of later weights.

Engines (``rollout.engine``):

- ``transformers``: ``model.generate`` on the training student itself (LoRA adapters on, eval mode, KV cache on),
  left-padded, length-sorted batches, through the same runner as `teacherfit generate`
  (``generation.TransformersGenerator``). Under DDP each process generates its own rows.
- ``openai``: a server that serves the student (vLLM, SGLang, llama.cpp), asked for text completions of the
  rendered prompts; the text is tokenized back with the student's tokenizer. Keeping the server's weights current
  is the user's: servers that reload weights do it through their own admin APIs (see the README).
- ``vllm``: vLLM in process (GPU), the student's weights loaded into the engine every ``rollout.sync_every`` steps.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

import torch
from torch import nn

from teacherfit.config import DecodingConfig, RolloutOptions
from teacherfit.data import IGNORE_INDEX, TokenizedExample
from teacherfit.distill.examples import TrainExample

BUFFER_FILE = "rollouts-rank{rank}.json"


def response_start(labels: list[int]) -> int:
    """Where the last labelled response begins (the prompt of an on-policy rollout is everything before it:
    earlier turns stay as context, unlabelled)."""
    end = max(i for i, y in enumerate(labels) if y != IGNORE_INDEX)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def prompt_ids(example: TrainExample) -> list[int]:
    """What the student continues: the example's ids before its last response."""
    return example.tokens.input_ids[: response_start(example.tokens.labels)]


def rollout_example(example: TrainExample, response: list[int], max_length: int) -> TrainExample | None:
    """The example with its last response replaced by the student's sampled ids (labelled), cut to max_length;
    None when no sampled token fits."""
    prompt = prompt_ids(example)
    response = response[: max(0, max_length - len(prompt))]
    if not response:
        return None
    return TrainExample(example.key, TokenizedExample(
        input_ids=prompt + response, labels=[IGNORE_INDEX] * len(prompt) + response,
        n_prompt_tokens=len(prompt), n_response_tokens=len(response), truncated=False))


class RolloutEngine(Protocol):
    name: str

    def generate(self, prompts: list[list[int]], decoding: DecodingConfig) -> list[list[int]]:
        """The sampled response ids of each prompt (a stop token that ended it included), in order."""
        ...

    def sync(self, step: int) -> None:
        """Bring the engine's weights up to the student's (engines with their own copy)."""
        ...

    def close(self) -> None: ...


def _seed_of(*parts: int) -> int:
    return random.Random(":".join(str(p) for p in parts)).getrandbits(31)


class TransformersRollouts:
    """The training student samples with ``generate`` (LoRA included): eval mode while it samples, KV cache on,
    the RNG forked so that training's dropout and data RNG are untouched."""

    name = "transformers"
    # generation settings on top of the plain config sampling uses (a benchmark forcing exact lengths sets
    # {"min_new_tokens": N}); the student's own generation_config is never read
    generation_defaults: dict[str, Any] = {}

    def __init__(self, student: nn.Module, tokenizer, device: torch.device, *, batch_size: int | None, autocast=None):
        from teacherfit.generation import TransformersGenerator

        self.student, self.device, self.batch_size, self.autocast = student, device, batch_size, autocast
        loaded = SimpleNamespace(model=student, tokenizer=tokenizer, device=device, provenance={})
        self.runner = TransformersGenerator(loaded, batch_size=batch_size or 1)
        # no_grad rather than inference_mode: a model that updates a buffer in forward (dynamic RoPE) must not
        # leave an inference tensor behind for the next training backward
        self.runner.grad_mode = torch.no_grad

    def generate(self, prompts: list[list[int]], decoding: DecodingConfig) -> list[list[int]]:
        import contextlib

        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # long first: little padding per batch
        size = self.batch_size or max(1, len(prompts))
        out: list[list[int]] = [[] for _ in prompts]
        was_training = self.student.training
        config = getattr(self.student, "config", None)
        use_cache = getattr(config, "use_cache", None)
        self.student.eval()
        if config is not None:
            config.use_cache = True
        # the student's own distribution: no repetition penalty, top-k or other default of its generation config
        from transformers import GenerationConfig

        model = self.student.get_base_model() if hasattr(self.student, "get_base_model") else self.student
        shipped = getattr(model, "generation_config", None)
        model.generation_config = GenerationConfig(eos_token_id=self.runner.stop_ids,
                                                   pad_token_id=getattr(shipped, "pad_token_id", None),
                                                   **self.generation_defaults)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), (self.autocast or contextlib.nullcontext)():
                for k, start in enumerate(range(0, len(order), size)):
                    chunk = order[start : start + size]
                    batch = DecodingConfig(**{**decoding.model_dump(), "seed": _seed_of(decoding.seed, k)})
                    for i, done in zip(chunk, self.runner._generate_chunk([prompts[i] for i in chunk], batch)):
                        out[i] = list(done[0].token_ids or [])
        finally:
            model.generation_config = shipped
            if config is not None:
                config.use_cache = use_cache
            self.student.train(was_training)
        return out

    def sync(self, step: int) -> None:
        pass  # it is the student

    def close(self) -> None:
        pass


class ServerRollouts:
    """A server that serves the student (``rollout.remote``): text completions of the rendered prompts, with the
    remote backend's bounded concurrency and retries; the text is tokenized back with the student's tokenizer
    and ends with EOS when the server stopped on it."""

    name = "openai"

    def __init__(self, remote, tokenizer):
        from teacherfit.remote import make_client

        from teacherfit.generation import stop_token_ids

        remote.check_key()
        self.cfg, self.tokenizer = remote, tokenizer
        self.client = make_client(remote)
        stops = stop_token_ids(tokenizer)
        if not stops:
            raise ValueError("rollout.engine openai: the student's tokenizer has no EOS or end-of-turn token to end "
                             "a finished sample with")
        # the token a finished sample ends with (the server does not return it): EOS, else the first stop token
        self.end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else stops[0]

    def generate(self, prompts: list[list[int]], decoding: DecodingConfig) -> list[list[int]]:
        from concurrent.futures import ThreadPoolExecutor

        from teacherfit.remote import text_completion

        def one(i: int) -> list[int]:
            text = self.tokenizer.decode(prompts[i], skip_special_tokens=False)
            response = text_completion(self.client, self.cfg, text, max_tokens=decoding.max_new_tokens,
                                       temperature=decoding.temperature, top_p=decoding.top_p,
                                       seed=_seed_of(decoding.seed, i))
            choice = response["choices"][0]
            ids = self.tokenizer.encode(choice.get("text") or "", add_special_tokens=False)[: decoding.max_new_tokens]
            if choice.get("finish_reason") == "stop" and len(ids) < decoding.max_new_tokens:
                ids.append(self.end)
            return ids or [self.end]

        with ThreadPoolExecutor(max_workers=self.cfg.concurrency * len(self.cfg.urls)) as pool:
            return list(pool.map(one, range(len(prompts))))

    def sync(self, step: int) -> None:
        pass  # the server's weights are the user's to keep current (README, "On-policy distillation")

    def close(self) -> None:
        pass


class VLLMRollouts:  # pragma: no cover - GPU machines with vLLM only
    """vLLM in process on the training GPU, fed the student's current weights every ``sync_every`` steps.

    The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that the driver worker's model is
    reachable and takes ``load_weights`` (the path TRL's colocated mode uses); a LoRA student is merged for the
    sync and unmerged after. Tensor parallelism is refused (each process would need its shard).
    """

    name = "vllm"

    def __init__(self, student: nn.Module, tokenizer, model_path: str, opts: RolloutOptions, *,
                 trust_remote_code: bool, max_length: int):
        import os

        from teacherfit.generation import check_vllm_engine
        from teacherfit.models import resolve_model

        engine = opts.vllm_engine(max_length)
        kwargs = check_vllm_engine(engine, "rollout.vllm")
        if engine.tensor_parallel_size * engine.pipeline_parallel_size != 1:
            raise ValueError("rollout.vllm: the in-process engine takes the student's weights on one GPU; set "
                             "tensor_parallel_size and pipeline_parallel_size to 1 (or serve it: engine 'openai')")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        from teacherfit.generation import stop_token_ids

        self.student, self.opts = student, opts
        self.stop_ids = stop_token_ids(tokenizer, student)
        where = resolve_model(model_path).location  # packaged and GGUF students: their converted folder
        self.llm = LLM(model=where, tokenizer=where, trust_remote_code=trust_remote_code, **kwargs)
        self.synced = -1

    def _engine_model(self):
        return self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model

    def sync(self, step: int) -> None:
        if self.synced >= 0 and step - self.synced < self.opts.sync_every:
            return
        model = self.student
        lora = hasattr(model, "merge_adapter")
        if lora:
            model.merge_adapter()
        try:
            base = model.get_base_model() if lora else model
            state = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "lora_" not in k}
            self._engine_model().load_weights(state.items())
        finally:
            if lora:
                model.unmerge_adapter()
        self.llm.reset_prefix_cache()
        self.synced = step

    def generate(self, prompts: list[list[int]], decoding: DecodingConfig) -> list[list[int]]:
        from vllm import SamplingParams

        # one seed per prompt: the same prompt twice in a buffer gets two samples
        params = [SamplingParams(temperature=decoding.temperature, top_p=decoding.top_p,
                                 max_tokens=decoding.max_new_tokens, seed=_seed_of(decoding.seed, i),
                                 stop_token_ids=self.stop_ids) for i in range(len(prompts))]
        results = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(r.outputs[0].token_ids) for r in results]

    def close(self) -> None:
        del self.llm


@dataclass
class Buffer:
    """One generation buffer: the window of steps it covers and, per step, the rollouts (example index ->
    sampled response ids) of this process."""

    window: int
    generated_at: int
    rollouts: dict[int, dict[int, list[int]]]

    def to_json(self) -> dict[str, Any]:
        return {"window": self.window, "generated_at": self.generated_at,
                "rollouts": {str(s): {str(i): r for i, r in rows.items()} for s, rows in self.rollouts.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Buffer:
        return cls(int(data["window"]), int(data["generated_at"]),
                   {int(s): {int(i): list(r) for i, r in rows.items()} for s, rows in data["rollouts"].items()})


class OnPolicy:
    """Turns a step's examples into its micro-batches' examples, the chosen ones with the student's own samples.

    ``step_indices(step)``: the example indices of each micro-batch of ``step`` for this process (the schedule).
    """

    def __init__(self, share: float, opts: RolloutOptions, engine: RolloutEngine, examples: list[TrainExample], *,
                 step_indices, total_steps: int, max_length: int, seed: int, rank: int):
        self.share, self.opts, self.engine, self.examples = share, opts, engine, examples
        self.step_indices, self.total_steps = step_indices, total_steps
        self.max_length, self.seed, self.rank = max_length, seed, rank
        self.buffer: Buffer | None = None

    def chosen(self, step: int) -> list[int]:
        """The example indices of this process's rows in ``step`` that the student answers itself."""
        rows = [i for micro in self.step_indices(step) for i in micro]
        rng = random.Random(_seed_of(self.seed, step, self.rank, 17))
        exact = self.share * len(rows)
        count = math.floor(exact) + (rng.random() < exact - math.floor(exact))
        order = rows[:]
        rng.shuffle(order)
        return sorted(order[:count])

    def _fill(self, step: int) -> float:
        """Generate the buffer that covers ``step``; returns the seconds it took."""
        window = step // self.opts.buffer_steps
        steps = range(window * self.opts.buffer_steps, min((window + 1) * self.opts.buffer_steps, self.total_steps))
        wanted = [(s, i) for s in steps for i in self.chosen(s)]
        prompts = [prompt_ids(self.examples[i]) for _, i in wanted]
        clock = time.perf_counter()
        self.engine.sync(step)
        responses: list[list[int]] = []
        if prompts:
            # the shortest prompt's budget; longer prompts' samples are cut to max_length (``rollout_example``)
            new = max(1, min(self.opts.max_new_tokens, self.max_length - min(len(p) for p in prompts)))
            responses = self.engine.generate(prompts, self.opts.decoding(_seed_of(self.seed, window, self.rank))
                                             .model_copy(update={"max_new_tokens": new}))
        rollouts: dict[int, dict[int, list[int]]] = {s: {} for s in steps}
        for (s, i), response in zip(wanted, responses):
            rollouts[s][i] = response
        self.buffer = Buffer(window, step, rollouts)
        return time.perf_counter() - clock

    def examples_for(self, step: int) -> tuple[list[list[TrainExample]], dict[str, float]]:
        """Each micro-batch's examples for ``step`` and the step's rollout numbers for the log (this process)."""
        seconds = 0.0
        if self.buffer is None or self.buffer.window != step // self.opts.buffer_steps:
            seconds = self._fill(step)
        mine = self.buffer.rollouts.get(step, {})
        micros, generated, tokens, rows = [], 0, 0, 0
        for indices in self.step_indices(step):
            batch = []
            for i in indices:
                rows += 1
                example = self.examples[i]
                if i in mine:
                    rolled = rollout_example(example, mine[i], self.max_length)
                    if rolled is not None:
                        example = rolled
                        generated += 1
                        tokens += rolled.tokens.n_response_tokens
                batch.append(example)
            micros.append(batch)
        return micros, {"rollout_rows": generated, "rows": rows, "rollout_tokens": tokens,
                        "rollout_s": seconds, "rollout_age": step - self.buffer.generated_at}

    # ------------------------------------------------------------ checkpoints

    def save(self, folder: Path) -> None:
        if self.buffer is not None:
            (folder / BUFFER_FILE.format(rank=self.rank)).write_text(json.dumps(self.buffer.to_json()))

    def load(self, folder: Path) -> None:
        path = folder / BUFFER_FILE.format(rank=self.rank)
        self.buffer = Buffer.from_json(json.loads(path.read_text())) if path.exists() else None

    def close(self) -> None:
        self.engine.close()


def build_engine(opts: RolloutOptions, student: nn.Module, tokenizer, device: torch.device, *, model_path: str,
                 trust_remote_code: bool, max_length: int, autocast=None) -> RolloutEngine:
    if opts.engine == "openai":
        return ServerRollouts(opts.remote, tokenizer)
    if opts.engine == "vllm":
        return VLLMRollouts(student, tokenizer, model_path, opts, trust_remote_code=trust_remote_code,
                            max_length=max_length)
    return TransformersRollouts(student, tokenizer, device, batch_size=opts.batch_size, autocast=autocast)
