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

from pydantic import BaseModel, ConfigDict, Field


class DecodingConfig(BaseModel):
    """Decoding settings, recorded with every generated row."""

    model_config = ConfigDict(extra="forbid")  # a typo (`temprature`, `max_tokens`) is an error, not a default

    max_new_tokens: int = Field(256, ge=1, description="Most tokens generated per response.")
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy decoding (the paper's default).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (only when temperature > 0).")
    n: int = Field(1, ge=1, description="Candidates per prompt; with n > 1 best-of-N keeps the best by reward.")
    seed: int = Field(0, description="Seed for sampling; recorded with each row.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Completion:
    """One generated response and its accounting."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or stop string), "length" (hit max_new_tokens)
    extra: dict[str, Any] = field(default_factory=dict)


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


class TransformersGenerator:
    """In-process batched generation with transformers.

    Prompts are rendered with the model's chat template (the documented plain template for base models),
    sorted by length so that each batch pads little, left-padded (decoder-only models continue from the
    last real token), and stopped on EOS / end-of-turn tokens.
    """

    backend = "transformers"

    def __init__(self, loaded, *, batch_size: int = 16, max_prompt_tokens: int | None = None):
        self.loaded = loaded
        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.stop_ids = stop_token_ids(loaded.tokenizer, loaded.model)

    def provenance(self) -> dict[str, Any]:
        import transformers

        from teacherfit.data import chat_template_for

        plain = chat_template_for(self.loaded.tokenizer)[1]
        return dict(self.loaded.provenance, backend=self.backend, engine_version=transformers.__version__,
                    chat_template="plain (model has none)" if plain else "model's own")

    def generate(
        self, prompts: list[list[dict[str, str]]], decoding: DecodingConfig
    ) -> Iterator[tuple[int, list[Completion]]]:
        import torch

        from teacherfit.data import tokenize_prompt
        from teacherfit.scoring import pad_batch

        tok, model = self.loaded.tokenizer, self.loaded.model
        encoded = [tokenize_prompt(tok, p, max_length=self.max_prompt_tokens) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.stop_ids[0]
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            ids, mask = pad_batch([encoded[i] for i in batch], pad_id, left=True)
            width = ids.shape[1]
            torch.manual_seed(decoding.seed)
            sampling = dict(do_sample=True, temperature=decoding.temperature, top_p=decoding.top_p)
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids.to(self.loaded.device),
                    attention_mask=mask.to(self.loaded.device),
                    max_new_tokens=decoding.max_new_tokens,
                    num_return_sequences=decoding.n,
                    eos_token_id=self.stop_ids,
                    pad_token_id=pad_id,
                    **(dict(do_sample=False, temperature=None, top_p=None, top_k=None) if decoding.greedy else sampling),
                )
            new = out[:, width:].tolist()
            for row, i in enumerate(batch):
                completions = [
                    self._completion(new[row * decoding.n + k], len(encoded[i]), decoding.max_new_tokens)
                    for k in range(decoding.n)
                ]
                yield i, completions

    def _completion(self, tokens: list[int], prompt_tokens: int, max_new: int) -> Completion:
        stop = next((k for k, t in enumerate(tokens) if t in self.stop_ids), None)
        kept = tokens if stop is None else tokens[:stop]
        text = self.loaded.tokenizer.decode(kept, skip_special_tokens=True)
        return Completion(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(kept) + (stop is not None),  # the stop token was generated too
            finish_reason="stop" if stop is not None else "length",
        )


class VLLMGenerator:
    """vLLM in process (GPU machines); installed with the ``vllm`` extra."""

    backend = "vllm"

    def __init__(self, model: str, *, revision: str | None = None, trust_remote_code: bool = False, **engine_args):
        try:
            from vllm import LLM
        except ImportError as err:  # pragma: no cover - GPU machines only
            raise RuntimeError("the vllm backend needs `pip install teacherfit[vllm]` on a CUDA machine") from err
        self.model_id = model
        self.revision = revision
        self.llm = LLM(model=model, revision=revision, trust_remote_code=trust_remote_code, **engine_args)

    def provenance(self) -> dict[str, Any]:  # pragma: no cover - GPU machines only
        import vllm

        return {"model": self.model_id, "revision": self.revision or "main", "backend": self.backend,
                "engine_version": vllm.__version__}

    def generate(self, prompts, decoding):  # pragma: no cover - GPU machines only
        from vllm import SamplingParams

        params = SamplingParams(
            n=decoding.n,
            temperature=decoding.temperature,
            top_p=decoding.top_p,
            max_tokens=decoding.max_new_tokens,
            seed=decoding.seed,
        )
        # vLLM batches internally (continuous batching); results come back in prompt order
        for i, result in enumerate(self.llm.chat(prompts, params, use_tqdm=False)):
            yield i, [
                Completion(
                    text=o.text,
                    prompt_tokens=len(result.prompt_token_ids),
                    completion_tokens=len(o.token_ids),
                    finish_reason="length" if o.finish_reason == "length" else "stop",
                )
                for o in result.outputs
            ]
