"""OpenAI-compatible servers (backends layer): vLLM, SGLang, TGI and llama.cpp behind one client.

- Requests go through the ``openai`` client with its own retries switched off, so that every retry is
  ours: counted in ``stats``, logged, and limited to errors that can heal (connection errors, timeouts,
  429 and 5xx). Any other 4xx means the request itself is wrong, and repeating it cannot help.
- In-flight requests are bounded by ``RemoteConfig.concurrency``; completions are yielded as they finish
  so that the caller's resumable store keeps every row that exists when a later prompt fails.
- The API key is read from the environment variable named in the config (``api_key_env``), and only
  then: no key is sent to a server the user did not name one for, except ``OPENAI_API_KEY`` to OpenAI's
  own API. A named variable that is unset is an error before the first request. The key is never stored
  in the config, provenance, logs or error messages; text that comes back from the server is scrubbed of
  it too, since some servers echo the credential they rejected.
- Credentials written into ``base_url`` (``https://user:secret@host/v1``, ``?api-key=...``) work, but every
  place that shows or stores the URL uses ``redact_url``.
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
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from teacherfit.generation import Completion, DecodingConfig

log = logging.getLogger(__name__)

# Local servers (llama.cpp, vLLM without --api-key) accept any key, but the client insists on one.
PLACEHOLDER_KEY = "EMPTY"
MAX_BACKOFF_S = 30.0


class RemoteError(RuntimeError):
    """A request failed for good: at once on a client error, or after its retries ran out."""


# Query parameters that carry credentials in the URL forms servers and gateways accept.
_SECRET_PARAMS = ("key", "api-key", "api_key", "apikey", "token", "access_token", "auth", "password", "secret",
                  "sig", "signature", "code")
OPENAI_HOSTS = ("api.openai.com",)


def redact_url(url: str) -> str:
    """``url`` with a password in its user part and credential-like query values replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        netloc = (user.split(":", 1)[0] + ":***" if ":" in user else "***") + "@" + host
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if any(s in k.lower() for s in _SECRET_PARAMS) else v) for k, v in pairs],
                          safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_secrets(url: str) -> list[str]:
    """The secret values inside ``url`` (password, credential-like query values), to scrub from any text."""
    try:
        parts = urlsplit(url)
        found = [parts.password] if parts.password else []
        if parts.username and not parts.password:
            found.append(parts.username)  # a bare token as the user part (https://TOKEN@host)
        found += [v for k, v in parse_qsl(parts.query) if v and any(s in k.lower() for s in _SECRET_PARAMS)]
    except ValueError:
        return [url]
    return [f for f in found if len(f) >= 3]


class RemoteConfig(BaseModel):
    """Where the OpenAI-compatible server is and how hard to push it."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(description='Server root including the API prefix, e.g. "http://127.0.0.1:8000/v1".')
    model: str = Field(description="Model name the server expects in each request.")
    api_key_env: str | None = Field(
        None,
        description="Name of the environment variable holding the API key. Unset: no key is sent "
        f"({PLACEHOLDER_KEY!r}, which local servers accept), except OPENAI_API_KEY to api.openai.com.",
    )
    concurrency: int = Field(8, ge=1, description="Most requests in flight at once.")
    timeout_s: float = Field(120.0, gt=0.0, description="Seconds before one request counts as failed.")
    max_retries: int = Field(4, ge=0, description="Retries per request on connection errors, timeouts, 429 and 5xx.")
    backoff_s: float = Field(0.5, ge=0.0, description="First retry delay; doubles per retry, with jitter.")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        try:
            parts = urlsplit(v)
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise ValueError(f"{redact_url(v)!r} is not a URL; e.g. http://127.0.0.1:8000/v1") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{redact_url(v)!r} is not an http(s) URL with a host; e.g. http://127.0.0.1:8000/v1")
        return v

    def identity(self) -> dict[str, str]:
        """What this endpoint is, safe to write, log or hash into an id: the masked URL and the model name."""
        return {"base_url": redact_url(self.base_url), "model": self.model}

    def key_env(self) -> str | None:
        """The variable the key is read from: the one the config names, or OPENAI_API_KEY for OpenAI's API."""
        if self.api_key_env:
            return self.api_key_env
        return "OPENAI_API_KEY" if (urlsplit(self.base_url).hostname or "") in OPENAI_HOSTS else None

    def check_key(self) -> None:
        """Raise ``RemoteError`` when the config names a key variable that is not set (before any request)."""
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise RemoteError(f"remote.api_key_env: the environment variable {self.api_key_env} is not set; "
                              f"export it, or remove api_key_env for a server that needs no key")


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
    """The key to send: the named environment variable's value, or the placeholder local servers accept."""
    cfg.check_key()
    env = cfg.key_env()
    return (os.environ.get(env) if env else None) or PLACEHOLDER_KEY


def make_client(cfg: RemoteConfig) -> OpenAI:
    """An ``openai`` client that never retries on its own (``chat_completion`` does, countably)."""
    return OpenAI(base_url=cfg.base_url, api_key=api_key(cfg), timeout=cfg.timeout_s, max_retries=0)


def _redact(text: str, cfg: RemoteConfig) -> str:
    env = cfg.key_env()
    key = os.environ.get(env) if env else None
    text = text.replace(cfg.base_url, redact_url(cfg.base_url))
    for secret in url_secrets(cfg.base_url) + ([key] if key else []):
        text = text.replace(secret, "***")
    return text


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
                raise RemoteError(f"{redact_url(cfg.base_url)} refused the request ({reason}); not retried") from None
            log.warning("attempt %d/%d to %s failed: %s", attempt + 1, cfg.max_retries + 1, redact_url(cfg.base_url),
                        reason)
    stats.add("failures")
    raise RemoteError(f"{redact_url(cfg.base_url)}: gave up after {cfg.max_retries + 1} attempts; "
                      f"last error: {reason}; is the server running at that address?")


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
            "base_url": redact_url(self.cfg.base_url),
            "model": self.cfg.model,
            "server_model": self.server_model,
            "api_key_env": self.cfg.key_env(),
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
