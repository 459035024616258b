"""OpenAI-compatible servers (backends layer): vLLM, SGLang, TGI and llama.cpp behind one client.

- Requests go through the ``openai`` client with its own retries switched off, so that every retry is
  ours: counted in ``stats``, logged, and limited to errors that can heal (connection errors, timeouts,
  429 and 5xx). Any other 4xx means the request itself is wrong, and repeating it cannot help.
- In-flight requests are bounded by ``RemoteConfig.concurrency``; completions are yielded as they finish
  so that the caller's resumable store keeps every row that exists when a later prompt fails.
- The API key is read from the environment variable named in the config. It is never stored in the
  config, provenance, logs or error messages; text that comes back from the server is scrubbed of it
  too, since some servers echo the credential they rejected.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import cached_property
from typing import Any, Iterator

import openai
from openai import OpenAI
from pydantic import BaseModel, Field

from teacherfit.generation import Completion, DecodingConfig

log = logging.getLogger(__name__)

# Local servers (llama.cpp, vLLM without --api-key) accept any key, but the client insists on one.
PLACEHOLDER_KEY = "EMPTY"
MAX_BACKOFF_S = 30.0


class RemoteError(RuntimeError):
    """A request failed for good: at once on a client error, or after its retries ran out."""


class RemoteConfig(BaseModel):
    """Where the OpenAI-compatible server is and how hard to push it."""

    base_url: str = Field(description='Server root including the API prefix, e.g. "http://127.0.0.1:8000/v1".')
    model: str = Field(description="Model name the server expects in each request.")
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description=f"Name of the environment variable holding the API key ({PLACEHOLDER_KEY!r} is sent when unset).",
    )
    concurrency: int = Field(8, ge=1, description="Most requests in flight at once.")
    timeout_s: float = Field(120.0, gt=0.0, description="Seconds before one request counts as failed.")
    max_retries: int = Field(4, ge=0, description="Retries per request on connection errors, timeouts, 429 and 5xx.")
    backoff_s: float = Field(0.5, ge=0.0, description="First retry delay; doubles per retry, with jitter.")


class RequestStats:
    """Counters shared by the worker threads of one generator.

    ``requests`` counts HTTP attempts (retries included), ``retries`` the attempts after a first one, and
    ``failures`` the calls that gave up.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {"requests": 0, "retries": 0, "failures": 0}

    def add(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def api_key(cfg: RemoteConfig) -> str:
    """The key to send: the environment variable's value, or the placeholder local servers accept."""
    return os.environ.get(cfg.api_key_env) or PLACEHOLDER_KEY


def make_client(cfg: RemoteConfig) -> OpenAI:
    """An ``openai`` client that never retries on its own (``chat_completion`` does, countably)."""
    return OpenAI(base_url=cfg.base_url, api_key=api_key(cfg), timeout=cfg.timeout_s, max_retries=0)


def _redact(text: str, cfg: RemoteConfig) -> str:
    key = api_key(cfg)
    return text if key == PLACEHOLDER_KEY else text.replace(key, "***")


def _describe(err: openai.OpenAIError, cfg: RemoteConfig) -> str:
    """A one-line account of a failed attempt, safe to log and to put in an exception."""
    if isinstance(err, openai.APITimeoutError):
        text = f"timed out after {cfg.timeout_s:g} s"
    elif isinstance(err, openai.APIStatusError):
        text = f"HTTP {err.status_code}: {err.message}"
    elif isinstance(err, openai.APIConnectionError) and err.__cause__ is not None:
        text = f"connection error: {err.__cause__!r}"
    else:
        text = f"{type(err).__name__}: {err}"
    return _redact(text, cfg)


def _retryable(err: openai.OpenAIError) -> bool:
    if isinstance(err, openai.APIStatusError):
        return err.status_code == 429 or err.status_code >= 500
    return isinstance(err, openai.APIConnectionError)  # timeouts are connection errors too


def _backoff_delay(cfg: RemoteConfig, retry: int) -> float:
    """Exponential backoff with jitter, so that concurrent workers do not retry in lockstep."""
    return min(cfg.backoff_s * 2 ** (retry - 1), MAX_BACKOFF_S) * random.uniform(0.5, 1.5)


def chat_completion(
    client: OpenAI,
    cfg: RemoteConfig,
    messages: list[dict[str, str]],
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    n: int = 1,
    logprobs: int | None = None,
    stats: RequestStats | None = None,
) -> dict[str, Any]:
    """One chat completion request, retried on errors that can heal; returns the response as a dict.

    ``logprobs`` asks for that many top alternatives per generated token. Raises ``RemoteError``
    with a redacted description of the last error.
    """
    stats = stats if stats is not None else RequestStats()
    request: dict[str, Any] = dict(
        model=cfg.model, messages=messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, n=n
    )
    if logprobs is not None:
        request.update(logprobs=True, top_logprobs=logprobs)
    for attempt in range(cfg.max_retries + 1):
        if attempt:
            stats.add("retries")
            time.sleep(_backoff_delay(cfg, attempt))
        stats.add("requests")
        try:
            return client.chat.completions.create(**request).model_dump()
        except openai.OpenAIError as err:
            reason = _describe(err, cfg)
            if not _retryable(err):
                stats.add("failures")
                # `from None`: the original exception carries the request, headers included.
                raise RemoteError(f"{cfg.base_url} refused the request ({reason}); not retried") from None
            log.warning("attempt %d/%d to %s failed: %s", attempt + 1, cfg.max_retries + 1, cfg.base_url, reason)
    stats.add("failures")
    raise RemoteError(f"{cfg.base_url}: gave up after {cfg.max_retries + 1} attempts; last error: {reason}")


def _completions(response: dict[str, Any], seed: int, wanted: int) -> list[Completion]:
    """Up to ``wanted`` completions from one response.

    ``usage`` covers the whole response. With one choice its counts are exact; when several choices
    share it, the completion tokens are split evenly and the row says so in ``extra``.
    """
    usage = response.get("usage")
    if not usage:
        raise RemoteError("the server's response has no `usage`; token counts are needed for every row")
    choices = response["choices"][:wanted]
    if not choices:
        raise RemoteError("the server returned no choices")
    extra: dict[str, Any] = {"seed": seed}
    if len(response["choices"]) > 1:
        extra["usage_shared_by"] = len(response["choices"])
    return [
        Completion(
            text=choice["message"]["content"] or "",
            prompt_tokens=usage["prompt_tokens"],
            completion_tokens=round(usage["completion_tokens"] / len(response["choices"])),
            finish_reason=choice["finish_reason"] or "unknown",
            extra=dict(extra),
        )
        for choice in choices
    ]


class OpenAICompatibleGenerator:
    """``Generator`` over any OpenAI-compatible chat completions server."""

    backend = "openai"

    def __init__(self, cfg: RemoteConfig) -> None:
        self.cfg = cfg
        self.client = make_client(cfg)
        self._stats = RequestStats()

    @property
    def stats(self) -> dict[str, int]:
        """Requests, retries and failures so far (a snapshot)."""
        return self._stats.as_dict()

    @cached_property
    def server_model(self) -> dict[str, Any] | None:
        """The ``/v1/models`` entry for our model, or the only entry (llama.cpp names it after the file).

        Asked once; None when the server does not say.
        """
        try:
            entries = [m.model_dump() for m in self.client.models.list().data]
        except openai.OpenAIError as err:
            log.warning("could not list the server's models: %s", _describe(err, self.cfg))
            return None
        match = [e for e in entries if e.get("id") == self.cfg.model]
        return match[0] if match else entries[0] if len(entries) == 1 else None

    def provenance(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "engine": f"openai-python {openai.__version__}",
            "base_url": self.cfg.base_url,
            "model": self.cfg.model,
            "server_model": self.server_model,
            "api_key_env": self.cfg.api_key_env,
        }

    def _complete(self, messages: list[dict[str, str]], decoding: DecodingConfig) -> list[Completion]:
        """``decoding.n`` completions for one prompt.

        Some servers (llama.cpp) ignore ``n`` and answer with one choice; the missing ones are asked
        for again with ``seed + i``, i being the number of completions already in hand, so samples differ
        and a rerun gets the same ones.
        """
        completions: list[Completion] = []
        while len(completions) < decoding.n:
            seed = decoding.seed + len(completions)
            wanted = decoding.n - len(completions)
            response = chat_completion(
                self.client,
                self.cfg,
                messages,
                max_tokens=decoding.max_new_tokens,
                temperature=decoding.temperature,
                top_p=1.0 if decoding.greedy else decoding.top_p,
                seed=seed,
                n=wanted,
                stats=self._stats,
            )
            completions.extend(_completions(response, seed, wanted))
        return completions

    def generate(
        self, prompts: list[list[dict[str, str]]], decoding: DecodingConfig
    ) -> Iterator[tuple[int, list[Completion]]]:
        """Yield ``(index, completions)`` as prompts finish; the first prompt that fails for good raises."""
        pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix="teacherfit-remote")
        try:
            futures = {pool.submit(self._complete, messages, decoding): i for i, messages in enumerate(prompts)}
            for future in as_completed(futures):
                index = futures[future]
                try:
                    completions = future.result()
                except RemoteError as err:
                    raise RemoteError(f"prompt {index} failed: {err}") from None
                yield index, completions
        finally:
            # On a failure, or when the caller stops iterating, drop the queued prompts instead of
            # running them all before returning; only the requests already in flight are waited for.
            pool.shutdown(wait=True, cancel_futures=True)
