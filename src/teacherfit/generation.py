"""Generation engines behind one small protocol (backends layer).

An engine turns chat prompts (lists of ``{"role", "content"}`` messages) into completions and yields
them as they finish, so that the caller can write each row the moment it exists (resumable runs).

Engines:
- ``TransformersGenerator``: in-process, batched (length-sorted batches, left padding, stop on EOS).
- ``OpenAICompatibleGenerator``: any OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp), with
  bounded concurrency, timeouts and retries with backoff; the API key comes from the environment.
- ``VLLMGenerator``: vLLM in process, when it is installed (GPU machines).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from teacherfit.config import DecodingConfig, VLLMEngineConfig


@dataclass
class Completion:
    """One generated response and its accounting."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or stop string), "length" (hit max_new_tokens)
    extra: dict[str, Any] = field(default_factory=dict)
    token_ids: list[int] | None = None  # in-process engines: the generated ids, the stop token included


class Generator(Protocol):
    """What every generation engine provides."""

    backend: str  # "transformers" | "openai" | "vllm"

    def provenance(self) -> dict[str, Any]:
        """Model id and hash or revision, engine name and version: stored with every row."""
        ...

    def generate(
        self, prompts: list[list[dict[str, str]]], decoding: DecodingConfig
    ) -> Iterator[tuple[int, list[Completion]]]:
        """Yield ``(index into prompts, decoding.n completions)`` as each prompt finishes, in any order."""
        ...


# Tokens that end an assistant turn in common chat templates; generation stops on any that the vocabulary has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """EOS ids from the tokenizer, the model's generation config and the known end-of-turn tokens."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return sorted(ids)


class ChunkedGenerator:
    """The runner shared by the in-process engines (transformers, vLLM).

    Prompts are rendered and tokenized here, with the model's chat template (the documented plain template
    for base models that have none), so both engines see the same token ids; they are sorted by length (long
    first, so memory trouble shows at once and each chunk pads little) and handed to the engine a chunk at a
    time. Every chunk's rows are yielded as soon as it finishes, so the caller writes them at once: a run
    killed mid-way loses at most the chunk in flight, and the progress bar moves per chunk.
    """

    backend = "?"
    chunk_size = 1

    def __init__(self, tokenizer, *, max_prompt_tokens: int | None = None, model=None):
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.stop_ids = stop_token_ids(tokenizer, model)

    def chat_template_note(self) -> str:
        from teacherfit.data import chat_template_for

        return "plain (model has none)" if chat_template_for(self.tokenizer)[1] else "model's own"

    def generate(
        self, prompts: list[list[dict[str, str]]], decoding: DecodingConfig
    ) -> Iterator[tuple[int, list[Completion]]]:
        from teacherfit.data import tokenize_prompt

        encoded = [tokenize_prompt(self.tokenizer, p, max_length=self.max_prompt_tokens) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        for start in range(0, len(order), self.chunk_size):
            chunk = order[start : start + self.chunk_size]
            for i, completions in zip(chunk, self._generate_chunk([encoded[i] for i in chunk], decoding)):
                yield i, completions

    def _generate_chunk(self, prompts: list[list[int]], decoding: DecodingConfig) -> list[list[Completion]]:
        """``decoding.n`` completions for each tokenized prompt of one chunk, in the chunk's order."""
        raise NotImplementedError

    def _completion(self, tokens: list[int], prompt_tokens: int, finish: str | None = None) -> Completion:
        """A completion from the generated ids: cut at the first stop id (which counts as generated)."""
        stop = next((k for k, t in enumerate(tokens) if t in self.stop_ids), None)
        kept = tokens if stop is None else tokens[:stop]
        return Completion(
            text=self.tokenizer.decode(kept, skip_special_tokens=True),
            prompt_tokens=prompt_tokens,
            completion_tokens=len(kept) + (stop is not None),
            finish_reason=finish or ("stop" if stop is not None else "length"),
            token_ids=tokens if stop is None else tokens[: stop + 1],
        )


class TransformersGenerator(ChunkedGenerator):
    """In-process batched generation with transformers: a chunk is one left-padded batch of ``batch_size``
    prompts (decoder-only models continue from the last real token), stopped on EOS / end-of-turn tokens."""

    backend = "transformers"
    grad_mode = None  # the context generation runs in (default: torch.inference_mode)

    def __init__(self, loaded, *, batch_size: int = 16, max_prompt_tokens: int | None = None):
        super().__init__(loaded.tokenizer, max_prompt_tokens=max_prompt_tokens, model=loaded.model)
        self.loaded = loaded
        self.chunk_size = batch_size

    @property
    def batch_size(self) -> int:
        return self.chunk_size

    def provenance(self) -> dict[str, Any]:
        import transformers

        return dict(self.loaded.provenance, backend=self.backend, engine_version=transformers.__version__,
                    chat_template=self.chat_template_note())

    def _generate_chunk(self, prompts: list[list[int]], decoding: DecodingConfig) -> list[list[Completion]]:
        import torch

        from teacherfit.scoring import pad_batch

        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        ids, mask = pad_batch(prompts, pad_id, left=True)
        width = ids.shape[1]
        torch.manual_seed(decoding.seed)
        # top_k=0: nucleus sampling only, as DecodingConfig says and vLLM / servers do (transformers would add the
        # default top_k=50 of a model whose generation config sets none)
        sampling = dict(do_sample=True, temperature=decoding.temperature, top_p=decoding.top_p, top_k=0)
        with (self.grad_mode or torch.inference_mode)():
            out = self.loaded.model.generate(
                input_ids=ids.to(self.loaded.device),
                attention_mask=mask.to(self.loaded.device),
                max_new_tokens=decoding.max_new_tokens,
                num_return_sequences=decoding.n,
                eos_token_id=self.stop_ids,
                pad_token_id=pad_id,
                **(dict(do_sample=False, temperature=None, top_p=None, top_k=None) if decoding.greedy else sampling),
            )
        new = out[:, width:].tolist()
        return [[self._completion(new[row * decoding.n + k], len(p)) for k in range(decoding.n)]
                for row, p in enumerate(prompts)]


def vllm_engine_fields() -> set[str]:
    """The field names of the installed vLLM's ``EngineArgs``; ``ValueError`` when vLLM is not installed."""
    import dataclasses

    try:
        from vllm import EngineArgs
    except ImportError:
        raise ValueError("backend 'vllm' needs vLLM, which is not installed here: on a CUDA machine run "
                         "`make install-gpu` (see the README, 'At scale'), or use backend 'openai' with `vllm serve`") from None
    return {f.name for f in dataclasses.fields(EngineArgs)}


def check_vllm_engine(engine: VLLMEngineConfig, where: str) -> dict[str, Any]:
    """Every check that needs no engine: vLLM installed, every engine field known to it, enough GPUs.
    Returns the keyword arguments for ``vllm.LLM``."""
    kwargs = engine.engine_kwargs(fields=vllm_engine_fields(), where=where)
    import torch

    gpus = torch.cuda.device_count()
    wanted = engine.tensor_parallel_size * engine.pipeline_parallel_size
    if wanted > gpus:
        raise ValueError(f"{where}: tensor_parallel_size x pipeline_parallel_size = {wanted} GPUs, but {gpus} are "
                         "visible here (CUDA_VISIBLE_DEVICES); lower them or run on a larger node")
    return kwargs


class VLLMGenerator(ChunkedGenerator):
    """vLLM in process (GPU machines; the ``vllm`` extra).

    The prompts are the runner's token ids (``{"prompt_token_ids": ...}`` prompts, vLLM's ``TokensPrompt``), so a
    base model without a chat template gets the same plain template as under transformers, instead of
    ``LLM.chat()`` raising. The generate pipeline starts each vLLM teacher in its own process, so the engine's
    GPU memory is returned when the process ends, before the next engine or the reward model loads.
    """

    backend = "vllm"

    def __init__(self, resolved, tokenizer, engine: VLLMEngineConfig, *, revision: str | None = None,
                 trust_remote_code: bool = False, max_prompt_tokens: int | None = None,
                 where: str = "vllm"):  # pragma: no cover - GPU machines with vLLM only
        kwargs = check_vllm_engine(engine, where)
        from vllm import LLM

        super().__init__(tokenizer, max_prompt_tokens=max_prompt_tokens)
        self.resolved = resolved
        self.engine = engine
        self.chunk_size = engine.chunk_size
        # a hub id goes to vLLM as it is (with its revision); packaged and GGUF models as their converted folder
        self.llm = LLM(model=resolved.location, tokenizer=resolved.location,
                       revision=revision if resolved.kind == "hub" else None,
                       trust_remote_code=trust_remote_code, **kwargs)

    def provenance(self) -> dict[str, Any]:  # pragma: no cover - GPU machines with vLLM only
        import vllm

        return dict(self.resolved.provenance, backend=self.backend, engine_version=vllm.__version__,
                    engine=self.engine.model_dump(exclude={"chunk_size"}), chat_template=self.chat_template_note())

    def _generate_chunk(self, prompts, decoding):  # pragma: no cover - GPU machines with vLLM only
        from vllm import SamplingParams

        params = SamplingParams(
            n=decoding.n,
            temperature=decoding.temperature,
            top_p=1.0 if decoding.greedy else decoding.top_p,
            max_tokens=decoding.max_new_tokens,
            seed=decoding.seed,
            stop_token_ids=self.stop_ids,
        )
        # vLLM schedules the chunk itself (continuous batching); results come back in the chunk's order
        results = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        return [[self._completion(list(o.token_ids), len(ids), "length" if o.finish_reason == "length" else "stop")
                 for o in result.outputs] for ids, result in zip(prompts, results)]
