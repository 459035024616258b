"""The OpenAI-compatible backend against a real llama.cpp server and against scripted loopback servers."""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Iterator

import pytest
from servers import serve_loopback

from teacherfit.generation import DecodingConfig
from teacherfit.remote import (
    OpenAICompatibleGenerator,
    RemoteConfig,
    RemoteError,
    RequestStats,
    chat_completion,
    make_client,
)

pytestmark = pytest.mark.server

PROMPTS = [
    [{"role": "user", "content": text}]
    for text in ("What is 2 + 2?", "Name a colour.", "Say hello.", "What is the capital of France?")
]


# --- a real llama.cpp server ------------------------------------------------------------------------



@pytest.mark.slow
def test_llama_cpp_greedy_is_complete_and_deterministic(llama_server):
    gen = OpenAICompatibleGenerator(RemoteConfig(base_url=llama_server, model="smollm2", concurrency=2))
    decoding = DecodingConfig(max_new_tokens=16)

    first = list(gen.generate(PROMPTS, decoding))
    assert sorted(index for index, _ in first) == [0, 1, 2, 3]
    for _, completions in first:
        assert len(completions) == 1
        (c,) = completions
        assert c.text.strip()
        assert 1 <= c.completion_tokens <= 16
        assert c.prompt_tokens > 0
        assert c.finish_reason in {"stop", "length"}

    second = dict(gen.generate(PROMPTS, decoding))
    assert {i: cs[0].text for i, cs in first} == {i: cs[0].text for i, cs in second.items()}
    assert gen.stats == {"requests": 8, "retries": 0, "failures": 0}
    provenance = gen.provenance()
    assert provenance["backend"] == "openai"
    assert provenance["server_model"]["id"] == "smollm2"


@pytest.mark.slow
def test_llama_cpp_ignores_n_so_missing_samples_are_requested_with_next_seeds(llama_server):
    gen = OpenAICompatibleGenerator(RemoteConfig(base_url=llama_server, model="smollm2"))
    decoding = DecodingConfig(max_new_tokens=8, temperature=0.8, n=2, seed=5)

    [(index, completions)] = list(gen.generate(PROMPTS[:1], decoding))
    assert index == 0
    assert [c.extra["seed"] for c in completions] == [5, 6]
    assert all(1 <= c.completion_tokens <= 8 for c in completions)
    assert gen.stats["requests"] == 2


# --- scripted loopback servers -------------------------------------------------------------------------


def completion_body(n_choices: int = 1) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "fake",
        "choices": [
            {"index": k, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}
            for k in range(n_choices)
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2 * n_choices, "total_tokens": 5 + 2 * n_choices},
    }


class FakeServer:
    """What a scripted server saw: the chat requests, their headers and the peak of requests in flight."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.authorizations: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.release = threading.Event()  # set at teardown, so that handlers asked to stall stop waiting


# A responder gets (the server's record, the request number from 0, the request body, its headers) and
# returns (HTTP status, JSON body).
Responder = Callable[[FakeServer, int, dict[str, Any], Any], tuple[int, dict[str, Any]]]


@contextmanager
def fake_server(respond: Responder) -> Iterator[tuple[str, FakeServer]]:
    """A chat completions endpoint on a free loopback port, answering as ``respond`` says."""
    state = FakeServer()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def _send(self, status: int, body: dict[str, Any]) -> None:
            payload = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and left

        def do_GET(self) -> None:
            model = {"id": "fake", "object": "model", "created": 0, "owned_by": "test"}
            self._send(200, {"object": "list", "data": [model]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                number = len(state.requests)
                state.requests.append(body)
                state.authorizations.append(self.headers.get("Authorization", ""))
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                status, reply = respond(state, number, body, self.headers)
            finally:
                with state.lock:
                    state.in_flight -= 1
            self._send(status, reply)

    try:
        with serve_loopback(Handler, state) as served:
            yield served
    finally:
        state.release.set()


def fast_config(base_url: str, **overrides: Any) -> RemoteConfig:
    settings: dict[str, Any] = dict(base_url=base_url, model="fake", timeout_s=2.0, max_retries=3, backoff_s=0.01)
    return RemoteConfig(**(settings | overrides))


def ask(cfg: RemoteConfig, stats: RequestStats) -> dict[str, Any]:
    messages = [{"role": "user", "content": "hi"}]
    return chat_completion(
        make_client(cfg), cfg, messages, max_tokens=4, temperature=0.0, top_p=1.0, seed=0, stats=stats
    )


def error_body(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "test", "code": None}}


@pytest.mark.parametrize("status", [429, 500, 503])
def test_server_errors_are_retried_until_success(status):
    def respond(state, number, body, headers):
        return (status, error_body("busy")) if number < 2 else (200, completion_body())

    with fake_server(respond) as (base_url, state):
        stats = RequestStats()
        response = ask(fast_config(base_url), stats)
    assert response["choices"][0]["message"]["content"] == "hello"
    assert stats.as_dict() == {"requests": 3, "retries": 2, "failures": 0}
    assert len(state.requests) == 3


def test_client_error_fails_at_once():
    with fake_server(lambda state, number, body, headers: (400, error_body("bad request"))) as (base_url, state):
        stats = RequestStats()
        with pytest.raises(RemoteError, match="HTTP 400.*not retried"):
            ask(fast_config(base_url), stats)
    assert stats.as_dict() == {"requests": 1, "retries": 0, "failures": 1}
    assert len(state.requests) == 1


def test_timeouts_are_retried_then_raise():
    def stall(state, number, body, headers):
        state.release.wait(5.0)
        return 200, completion_body()

    started = time.monotonic()
    with fake_server(stall) as (base_url, state):
        stats = RequestStats()
        with pytest.raises(RemoteError, match="gave up after 2 attempts.*timed out"):
            ask(fast_config(base_url, timeout_s=0.3, max_retries=1), stats)
    assert stats.as_dict() == {"requests": 2, "retries": 1, "failures": 1}
    assert time.monotonic() - started < 3.0


def test_in_flight_requests_are_bounded_by_concurrency():
    def slow_ok(state, number, body, headers):
        time.sleep(0.15)
        return 200, completion_body()

    prompts = [[{"role": "user", "content": f"prompt {k}"}] for k in range(12)]
    with fake_server(slow_ok) as (base_url, state):
        gen = OpenAICompatibleGenerator(fast_config(base_url, concurrency=3))
        indices = [index for index, _ in gen.generate(prompts, DecodingConfig(max_new_tokens=4))]
    assert sorted(indices) == list(range(12))
    assert 2 <= state.max_in_flight <= 3
    assert gen.stats == {"requests": 12, "retries": 0, "failures": 0}


def test_a_failed_prompt_names_its_index_and_stops_the_queue():
    def respond(state, number, body, headers):
        if body["messages"][0]["content"] == "Name a colour.":
            return 400, error_body("rejected")
        time.sleep(0.2)
        return 200, completion_body()

    with fake_server(respond) as (base_url, state):
        gen = OpenAICompatibleGenerator(fast_config(base_url, concurrency=1))
        done = []
        with pytest.raises(RemoteError, match="prompt 1 failed.*HTTP 400"):
            for index, _ in gen.generate(PROMPTS, DecodingConfig(max_new_tokens=4)):
                done.append(index)
    assert done == [0]  # what finished first reached the caller
    # prompt 2 was in flight when prompt 1 failed and was waited for; prompt 3 was never sent
    assert [r["messages"][0]["content"] for r in state.requests] == [p[0]["content"] for p in PROMPTS[:3]]
    assert gen.stats["failures"] == 1


def test_decoding_settings_reach_the_server_and_n_is_honoured_when_supported():
    with fake_server(lambda state, number, body, headers: (200, completion_body(body["n"]))) as (base_url, state):
        gen = OpenAICompatibleGenerator(fast_config(base_url))
        decoding = DecodingConfig(max_new_tokens=7, temperature=0.7, top_p=0.9, n=3, seed=11)
        [(_, completions)] = list(gen.generate(PROMPTS[:1], decoding))
    [request] = state.requests
    assert {k: request[k] for k in ("model", "max_tokens", "temperature", "top_p", "n", "seed")} == {
        "model": "fake", "max_tokens": 7, "temperature": 0.7, "top_p": 0.9, "n": 3, "seed": 11,
    }  # fmt: skip
    assert len(completions) == 3
    assert [c.completion_tokens for c in completions] == [2, 2, 2]
    assert all(c.extra == {"seed": 11, "usage_shared_by": 3} for c in completions)


def test_the_api_key_is_sent_but_never_stored_logged_or_reported(monkeypatch, caplog):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("TEACHERFIT_TEST_KEY", secret)
    caplog.set_level(logging.DEBUG)

    with fake_server(lambda state, number, body, headers: (200, completion_body())) as (base_url, state):
        cfg = fast_config(base_url, api_key_env="TEACHERFIT_TEST_KEY")
        gen = OpenAICompatibleGenerator(cfg)
        assert len(list(gen.generate(PROMPTS, DecodingConfig(max_new_tokens=4)))) == 4
        provenance = gen.provenance()
    assert state.authorizations == [f"Bearer {secret}"] * 4
    assert provenance["api_key_env"] == "TEACHERFIT_TEST_KEY"
    assert provenance["server_model"]["id"] == "fake"

    def echo_key(state, number, body, headers):
        # Some servers quote the credential they reject; first as a retryable error, then a final one.
        status = 503 if number == 0 else 401
        return status, error_body(f"invalid key in {headers['Authorization']}")

    with fake_server(echo_key) as (base_url, _):
        gen = OpenAICompatibleGenerator(fast_config(base_url, api_key_env="TEACHERFIT_TEST_KEY"))
        with pytest.raises(RemoteError) as failure:
            list(gen.generate(PROMPTS[:1], DecodingConfig(max_new_tokens=4)))
    assert "HTTP 401" in str(failure.value) and "***" in str(failure.value)
    assert "attempt 1/4" in caplog.text  # the 503 was logged ...

    for text in (json.dumps(provenance), repr(cfg), cfg.model_dump_json(), str(failure.value), caplog.text):
        assert secret not in text  # ... with the key scrubbed, as everywhere else
