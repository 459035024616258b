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
- ``base_url`` may list several servers that all serve the same model (a fleet of ``vllm serve`` / SGLang
  nodes). A ``ServerPool`` owns one client per URL and sends each request to the least busy server that is up,
  at most ``concurrency`` requests in flight per server. A server that does not answer (connection error,
  timeout) is left out for ``cooldown_s`` and the request goes at once to another; a 429/503 that says
  ``Retry-After`` is waited out (or sent elsewhere). The ``openai`` client honours ``Retry-After`` only inside
  its own retry loop, which always asks the same server again: that is why its retries are off and we retry.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from functools import cached_property
from typing import Any, Iterator
from urllib.parse import parse_qsl, urlsplit

import openai
from openai import OpenAI

from teacherfit.config import (
    _SECRET_PARAMS,
    MAX_RETRY_AFTER_S,
    OPENAI_HOSTS,
    PLACEHOLDER_KEY,
    DecodingConfig,
    RemoteConfig,
    RemoteError,
    redact_url,
)
from teacherfit.generation import Completion

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0


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


class RequestStats:
    """Counters shared by the worker threads of one generator.

    ``requests`` counts HTTP attempts (retries included), ``retries`` the attempts after a failed one (a
    server's Retry-After, a move to another server of a fleet), and ``failures`` the calls that gave up. The
    one resend with ``max_completion_tokens`` after a server refused ``max_tokens`` is a request, not a retry.
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


def api_key(cfg: RemoteConfig, url: str | None = None) -> str:
    """The key to send (to ``url``, one of the config's servers): the named environment variable's value, or
    the placeholder local servers accept."""
    cfg.check_key()
    env = cfg.key_env(url)
    return (os.environ.get(env) if env else None) or PLACEHOLDER_KEY


def _openai_client(cfg: RemoteConfig, url: str) -> OpenAI:
    return OpenAI(base_url=url, api_key=api_key(cfg, url), timeout=cfg.timeout_s, max_retries=0)


class Server:
    """One server of a pool: its ``openai`` client and what the pool knows of it (guarded by the pool's lock)."""

    def __init__(self, url: str, client: OpenAI, token_param: str) -> None:
        self.url = url
        self.shown = redact_url(url)
        self.client = client
        self.token_param = token_param  # "max_tokens" or "max_completion_tokens"
        self.in_flight = 0
        self.sent = 0
        self.down_until = 0.0  # time.monotonic() before which it is left out (unreachable, or said Retry-After)
        self.unreachable = False  # left out because it did not answer (rather than asked us to wait)

    def __repr__(self) -> str:
        return f"Server({self.shown!r}, in_flight={self.in_flight})"


class ServerPool:
    """The servers of one ``RemoteConfig`` (one, or a fleet serving the same model), one ``openai`` client each.

    ``acquire`` hands out the least busy server that is up, keeping at most ``cfg.concurrency`` requests in flight
    per server; ``mark_down`` leaves one out for a while. Thread-safe: one pool serves all the worker threads of
    a generator or a judge. With a single server nothing is ever left out for good: when every server is down,
    the one back soonest is asked anyway, and the caller's retry budget paces those attempts.
    """

    def __init__(self, cfg: RemoteConfig, clients: list[OpenAI] | None = None) -> None:
        self.cfg = cfg
        urls = cfg.urls
        clients = clients if clients is not None else [_openai_client(cfg, url) for url in urls]
        self.servers = [Server(url, client, _token_param(cfg, url)) for url, client in zip(urls, clients)]
        self._cond = threading.Condition()

    def acquire(self, avoid: set[Server] = frozenset()) -> Server:  # type: ignore[assignment]
        """The server for the next attempt, counted in flight until ``release``.

        Up servers first, those not in ``avoid`` (already tried by this request) first, then the fewest in
        flight, then the fewest sent; when all are down, the one back soonest. Waits while every server it could
        use has ``concurrency`` requests in flight.
        """
        with self._cond:
            while True:
                now = time.monotonic()
                up = [s for s in self.servers if s.down_until <= now]
                usable = [s for s in (up or self.servers) if s.in_flight < self.cfg.concurrency]
                if usable:
                    server = min(usable, key=lambda s: (s in avoid, max(s.down_until - now, 0.0), s.in_flight, s.sent))
                    server.in_flight += 1
                    server.sent += 1
                    return server
                back = [s.down_until - now for s in self.servers if s.down_until > now]
                self._cond.wait(timeout=min(back + [5.0]))

    def release(self, server: Server, answered: bool) -> None:
        """The attempt on ``server`` is over; ``answered``: it sent an HTTP answer (so it is reachable)."""
        with self._cond:
            server.in_flight -= 1
            if answered and server.unreachable:
                server.unreachable = False
                server.down_until = 0.0
                if len(self.servers) > 1:
                    log.warning("%s answers again", server.shown)
            self._cond.notify_all()

    def mark_down(self, server: Server, seconds: float, why: str, unreachable: bool) -> None:
        """Leave ``server`` out for ``seconds`` (it did not answer, or asked us to wait)."""
        with self._cond:
            now = time.monotonic()
            if len(self.servers) > 1 and server.down_until <= now and seconds > 0:
                log.warning("%s left out of the fleet for %.3g s: %s", server.shown, seconds, why)
            server.down_until = max(server.down_until, now + seconds)
            server.unreachable = server.unreachable or unreachable

    def others_up(self, tried: set[Server]) -> bool:
        """Whether a server this request has not tried is up (busy or not)."""
        with self._cond:
            now = time.monotonic()
            return any(s.down_until <= now for s in self.servers if s not in tried)

    def switch_token_param(self, err: openai.OpenAIError, sent: str) -> bool:
        """True when ``err`` is a server refusing ``max_tokens`` for ``max_completion_tokens`` (with
        ``token_limit_param: auto``): from now on every server of the pool gets ``max_completion_tokens``."""
        if self.cfg.token_limit_param != "auto" or sent != "max_tokens":
            return False
        if not isinstance(err, openai.APIStatusError) or err.status_code not in (400, 422):
            return False
        text = _server_message(err).lower()
        if not ("max_completion_tokens" in text or
                "max_tokens" in text and ("unsupported" in text or "not supported" in text)):
            return False
        with self._cond:
            if any(s.token_param == "max_tokens" for s in self.servers):
                log.warning("%s refused max_tokens (%s); sending max_completion_tokens from now on",
                            self.cfg.shown_urls(), _redact(_server_message(err), self.cfg))
            for s in self.servers:
                s.token_param = "max_completion_tokens"
        return True


def _token_param(cfg: RemoteConfig, url: str) -> str:
    if cfg.token_limit_param != "auto":
        return cfg.token_limit_param
    return "max_completion_tokens" if (urlsplit(url).hostname or "") in OPENAI_HOSTS else "max_tokens"


def make_client(cfg: RemoteConfig) -> ServerPool:
    """The config's servers, each with an ``openai`` client that never retries on its own (``chat_completion``
    does, countably, and can move to another server of a fleet)."""
    return ServerPool(cfg)


def _redact(text: str, cfg: RemoteConfig) -> str:
    env = cfg.key_env()
    key = os.environ.get(env) if env else None
    for url in sorted(cfg.urls, key=len, reverse=True):  # a URL that is a prefix of another goes last
        text = text.replace(url, redact_url(url))
    for secret in [s for url in cfg.urls for s in url_secrets(url)] + ([key] if key else []):
        text = text.replace(secret, "***")
    return text


def _server_message(err: openai.APIStatusError) -> str:
    """The server's own account of an error answer, on one line: the JSON body's ``error.message`` (OpenAI,
    vLLM, SGLang), ``detail`` (FastAPI servers such as llama-cpp-python), or the body's text."""
    body = err.body
    message: Any = None
    if isinstance(body, dict):
        message = body.get("message") or body.get("detail") or body.get("error")
    elif isinstance(body, str):
        message = body
    if isinstance(message, list):  # FastAPI's 422: [{"loc": [...], "msg": ...}, ...]
        message = "; ".join(
            f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" if isinstance(d, dict) else str(d) for d in message
        )
    if not isinstance(message, str) or not message.strip():
        message = json.dumps(body, default=str) if body else err.message
    text = " ".join(message.split())
    return text if len(text) <= 500 else text[:497] + "..."


def _describe(err: openai.OpenAIError, cfg: RemoteConfig) -> str:
    """A one-line account of a failed attempt, safe to log and to put in an exception."""
    if isinstance(err, openai.APITimeoutError):
        text = f"timed out after {cfg.timeout_s:g} s"
    elif isinstance(err, openai.APIStatusError):
        text = f"HTTP {err.status_code}: {_server_message(err)}"
    elif isinstance(err, openai.APIConnectionError) and err.__cause__ is not None:
        text = f"connection error: {err.__cause__!r}"
    else:
        text = f"{type(err).__name__}: {err}"
    return _redact(" ".join(text.split()), cfg)


def _retryable(err: openai.OpenAIError) -> bool:
    """Errors that can heal: no answer, a timeout, 408, 409 (lock), 429 and 5xx. Other 4xx: the request is wrong."""
    if isinstance(err, openai.APIStatusError):
        return err.status_code in (408, 409, 429) or err.status_code >= 500
    return isinstance(err, openai.APIConnectionError)  # timeouts are connection errors too


def _retry_after(err: openai.OpenAIError) -> float | None:
    """Seconds a 429 or 503 asked us to wait (``retry-after-ms``, else ``Retry-After`` in seconds or as an HTTP
    date), capped at ``MAX_RETRY_AFTER_S``; None when it did not say (or said something unreadable)."""
    if not isinstance(err, openai.APIStatusError) or err.status_code not in (429, 503):
        return None
    headers = err.response.headers
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            if scale != 1.0:
                continue
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                continue
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            seconds = (when - datetime.now(timezone.utc)).total_seconds()
        if math.isnan(seconds):
            continue
        return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)
    return None


def _backoff_delay(cfg: RemoteConfig, retry: int) -> float:
    """Exponential backoff with jitter, so that concurrent workers do not retry in lockstep."""
    return min(cfg.backoff_s * 2 ** (retry - 1), MAX_BACKOFF_S) * random.uniform(0.5, 1.5)


def _as_pool(client: ServerPool | OpenAI, cfg: RemoteConfig) -> ServerPool:
    if isinstance(client, ServerPool):
        return client
    if cfg.is_fleet:
        raise TypeError("a fleet's requests go through make_client(cfg) (a ServerPool), not one openai client")
    return ServerPool(cfg, clients=[client])  # one call's pool: what it learns lasts that call


def chat_completion(client: ServerPool | OpenAI, cfg: RemoteConfig, messages: list[dict[str, str]],
                    **options: Any) -> dict[str, Any]:
    """One chat completion request, retried on errors that can heal; returns the response as a dict.

    ``client``: ``make_client(cfg)``; ``options``: those of ``_chat_completion`` (max_tokens, temperature, top_p,
    seed, n, logprobs: that many top alternatives per generated token, stats). Raises ``RemoteError`` with a
    redacted description of the last error.
    """
    return _chat_completion(client, cfg, messages, **options)[0]


def _chat_completion(
    client: ServerPool | OpenAI,
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
) -> tuple[dict[str, Any], Server]:
    """``chat_completion``, and the server that answered.

    The retries are ours, not the ``openai`` client's (its own honour ``Retry-After`` but always ask the same
    server again): a server that does not answer is left out for ``cfg.cooldown_s`` and the request moves at
    once to another server of the fleet that this request has not tried, which costs no retry; a 429/503 with
    ``Retry-After`` leaves its server out that long and moves the same way. Otherwise (every server tried or
    down, a 5xx, a 429 that gives no time) a retry is spent: it waits ``Retry-After`` or the backoff, unless
    another server is up, and goes to the best server then (the one back soonest when all are down).
    """
    request: dict[str, Any] = dict(
        model=cfg.model, messages=messages, temperature=temperature, top_p=top_p, seed=seed, n=n
    )
    if logprobs is not None:
        request.update(logprobs=True, top_logprobs=logprobs)
    return _send(client, cfg, lambda server, token_param: server.client.chat.completions.create(
        **request, **{token_param: max_tokens}), stats)


def text_completion(client: ServerPool | OpenAI, cfg: RemoteConfig, prompt: str | list[int], *, max_tokens: int,
                    temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, echo: bool = False,
                    logprobs: int | None = None, extra_body: dict[str, Any] | None = None,
                    stats: RequestStats | None = None) -> dict[str, Any]:
    """One text completion request (``/v1/completions``: a raw prompt, already rendered with the chat template, or
    token ids where the server takes them), retried as ``chat_completion`` is; the response as a dict.

    ``echo`` + ``logprobs``: the prompt's own tokens with their log-probabilities (llama-cpp-python); vLLM's
    ``prompt_logprobs`` goes in ``extra_body``."""
    request: dict[str, Any] = dict(model=cfg.model, prompt=prompt, temperature=temperature, top_p=top_p, seed=seed)
    if echo:
        request["echo"] = True
    if logprobs is not None:
        request["logprobs"] = logprobs
    if extra_body:
        request["extra_body"] = extra_body
    # the completions API has one token-limit field, max_tokens (max_completion_tokens is chat's)
    return _send(client, cfg, lambda server, _param: server.client.completions.create(**request, max_tokens=max_tokens),
                 stats)[0]


def server_root(url: str) -> str:
    """The server's root (its non-OpenAI endpoints live there): ``base_url`` without the ``/v1`` API prefix."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def server_tokenize(client: ServerPool | OpenAI, cfg: RemoteConfig, text: str, *, server: str,
                    stats: RequestStats | None = None) -> list[int]:
    """How the server tokenizes ``text`` (special tokens parsed, nothing added): llama-cpp-python's
    ``/extras/tokenize`` or vLLM's ``/tokenize``, at the server's root; retried as every request is."""
    if server == "llama_cpp":
        path, body = "/extras/tokenize", {"input": text}
    else:
        path, body = "/tokenize", {"model": cfg.model, "prompt": text, "add_special_tokens": False}

    def call(srv: Server, _param: str) -> Any:
        return srv.client.with_options(base_url=server_root(srv.url)).post(path, body=body, cast_to=object)

    response = _send(client, cfg, call, stats)[0]
    if not isinstance(response, dict) or not isinstance(response.get("tokens"), list):
        raise RemoteError(f"{cfg.shown_urls()}{path} did not answer with a token list: is it a {server} server?")
    return [int(t) for t in response["tokens"]]


def _send(client: ServerPool | OpenAI, cfg: RemoteConfig, call, stats: RequestStats | None
          ) -> tuple[dict[str, Any], Server]:
    """``call(server, token_param)`` sent with our retries (see ``_chat_completion``); the response and the server."""
    pool = _as_pool(client, cfg)
    stats = stats if stats is not None else RequestStats()
    tried: set[Server] = set()  # since the last retry spent
    attempts = retries = 0
    failed = False
    while True:
        server = pool.acquire(tried)
        token_param = server.token_param
        stats.add("requests")
        if failed:
            stats.add("retries")
        attempts += 1
        try:
            response = call(server, token_param)
        except openai.OpenAIError as err:
            pool.release(server, answered=isinstance(err, openai.APIStatusError))
            error = err
        else:
            pool.release(server, answered=True)
            return (response.model_dump() if hasattr(response, "model_dump") else response), server
        if pool.switch_token_param(error, token_param):
            failed = False
            continue  # the same request with max_completion_tokens: not a retry
        failed = True
        reason = _describe(error, cfg)
        if not _retryable(error):
            stats.add("failures")
            # `from None`: the original exception carries the request, headers included.
            raise RemoteError(f"{server.shown} refused the request ({reason}); not retried") from None
        tried.add(server)
        unreachable = isinstance(error, openai.APIConnectionError)
        wait = _retry_after(error)
        if unreachable:
            pool.mark_down(server, cfg.cooldown_s, reason, unreachable=True)
        elif wait is not None:
            pool.mark_down(server, wait, f"{reason} (Retry-After: {wait:.3g} s)", unreachable=False)
        move = (unreachable or wait is not None) and pool.others_up(tried)
        log.warning("attempt %d/%d to %s failed: %s%s", retries + 1, cfg.max_retries + 1, server.shown, reason,
                    "; sending it to another server at once" if move else "")
        if move:
            continue
        if retries == cfg.max_retries:
            break
        retries += 1
        tried = {server}
        if pool.others_up(tried):
            delay = 0.0
        elif wait is not None:
            delay = wait
        else:
            delay = _backoff_delay(cfg, retries)
        time.sleep(delay)
    stats.add("failures")
    if len(pool.servers) == 1:
        raise RemoteError(f"{server.shown}: gave up after {attempts} attempts; "
                          f"last error: {reason}; is the server running at that address?")
    raise RemoteError(f"gave up after {attempts} attempts on the fleet {cfg.shown_urls()}; last error, from "
                      f"{server.shown}: {reason}; are the servers running at those addresses?")


def _completions(response: dict[str, Any], seed: int, wanted: int, server: str | None = None) -> list[Completion]:
    """Up to ``wanted`` completions from one response.

    ``usage`` covers the whole response. With one choice its counts are exact; when several choices
    share it, the completion tokens are split evenly and the row says so in ``extra``. ``server``: the
    (masked) URL of the fleet's server that answered, kept in ``extra["server"]``.
    """
    usage = response.get("usage")
    if not usage:
        raise RemoteError("the server's response has no `usage`; token counts are needed for every row")
    choices = response["choices"][:wanted]
    if not choices:
        raise RemoteError("the server returned no choices")
    extra: dict[str, Any] = {"seed": seed}
    if server is not None:
        extra["server"] = server
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
    """``Generator`` over any OpenAI-compatible chat completions server, or a fleet of them.

    The token limit goes in ``max_tokens``, or ``max_completion_tokens`` (``RemoteConfig.token_limit_param``).
    vLLM and SGLang take either. llama-cpp-python's server (0.3.36) reads only ``max_tokens``: its request model
    ignores fields it does not know, so with ``max_completion_tokens`` it is not told any limit and generates
    until the end of sequence or of its context. ``auto`` therefore sends ``max_tokens`` to every server but
    api.openai.com, and moves to ``max_completion_tokens`` only when a server refuses ``max_tokens``.
    """

    backend = "openai"

    def __init__(self, cfg: RemoteConfig) -> None:
        self.cfg = cfg
        self.client = make_client(cfg)  # a ServerPool: one openai client per server
        self._stats = RequestStats()

    @property
    def stats(self) -> dict[str, int]:
        """Requests, retries and failures so far (a snapshot)."""
        return self._stats.as_dict()

    @cached_property
    def server_model(self) -> dict[str, Any] | None:
        """The ``/v1/models`` entry for our model, or the only entry (llama.cpp names it after the file).

        Asked once (of a fleet, of the first server that answers); None when no server says.
        """
        for server in self.client.servers:
            try:
                entries = [m.model_dump() for m in server.client.models.list().data]
                break
            except openai.OpenAIError as err:
                log.warning("could not list the models of %s: %s", server.shown, _describe(err, self.cfg))
        else:
            return None
        match = [e for e in entries if e.get("id") == self.cfg.model]
        return match[0] if match else entries[0] if len(entries) == 1 else None

    def provenance(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "engine": f"openai-python {openai.__version__}",
            "base_url": [redact_url(u) for u in self.cfg.urls] if self.cfg.is_fleet else redact_url(self.cfg.base_url),
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
            response, server = _chat_completion(
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
            completions.extend(_completions(response, seed, wanted, server.shown if self.cfg.is_fleet else None))
        return completions

    def generate(
        self, prompts: list[list[dict[str, str]]], decoding: DecodingConfig
    ) -> Iterator[tuple[int, list[Completion]]]:
        """Yield ``(index, completions)`` as prompts finish; the first prompt that fails for good raises."""
        workers = self.cfg.concurrency * len(self.cfg.urls)  # the client's pool bounds each server's share
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="teacherfit-remote")
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
