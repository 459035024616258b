"""Fleets of OpenAI-compatible servers (issue 12): load balancing, failover, Retry-After, max_completion_tokens.

Real llama.cpp servers for the fleet itself (one killed mid-run), scripted loopback servers for the answers
a real one cannot be made to give (429 with Retry-After, a 400 about max_tokens, a 404 or 422).
"""

from __future__ import annotations

import email.utils
import importlib.util
import json
import threading
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Iterator

import pytest
from servers import serve_loopback
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

import teacherfit.remote as remote
from teacherfit.cli import app
from teacherfit.generation import DecodingConfig
from teacherfit.remote import (
    OpenAICompatibleGenerator,
    RemoteConfig,
    RemoteError,
    RequestStats,
    chat_completion,
    make_client,
    redact_url,
)
from teacherfit.store import sha256_json

pytestmark = pytest.mark.server

QUESTIONS = [
    "What is 2 + 2?", "Name a colour.", "Say hello.", "What is the capital of France?", "Name a fruit.",
    "Count to three.", "Name an animal.", "What is ice?", "Name a planet.", "Say goodbye.", "Name a tree.",
    "What is 3 + 5?", "Name a metal.", "Name a season.", "What is rain?", "Name a sport.",
]  # fmt: skip
PROMPTS = [[{"role": "user", "content": q}] for q in QUESTIONS]


# --- scripted loopback servers (with response headers) ------------------------------------------------------


def completion_body(text: str = "hello") -> dict[str, Any]:
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }  # fmt: skip


class Seen:
    """The chat request bodies a scripted server got, in order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []


# (number of the request from 0, its body) -> (status, JSON body, extra headers)
Responder = Callable[[int, dict[str, Any]], tuple[int, dict[str, Any], dict[str, str]]]


@contextmanager
def scripted_server(respond: Responder) -> Iterator[tuple[str, Seen]]:
    seen = Seen()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model", "created": 0,
                                                        "owned_by": "test"}]}, {})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with seen.lock:
                number = len(seen.requests)
                seen.requests.append(body)
            self._send(*respond(number, body))

    with serve_loopback(Handler, seen) as served:
        yield served


def always_ok(number: int, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    return 200, completion_body(), {}


def error_body(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": None}}


def fast(base_url: str | list[str], **overrides: Any) -> RemoteConfig:
    settings: dict[str, Any] = dict(base_url=base_url, model="fake", timeout_s=5.0, max_retries=3, backoff_s=0.01)
    return RemoteConfig(**(settings | overrides))


def ask(cfg: RemoteConfig, stats: RequestStats) -> dict[str, Any]:
    return chat_completion(make_client(cfg), cfg, [{"role": "user", "content": "hi"}], max_tokens=4,
                           temperature=0.0, top_p=1.0, seed=0, stats=stats)


def closed_url(credentials: str = "") -> str:
    from servers import free_port

    return f"http://{credentials}127.0.0.1:{free_port()}/v1"


# --- config -----------------------------------------------------------------------------------------------


def test_a_list_of_urls_is_a_fleet_and_empty_or_duplicate_lists_are_refused():
    cfg = RemoteConfig(base_url=["http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1"], model="m")
    assert cfg.urls == ["http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1"] and cfg.is_fleet
    assert RemoteConfig(base_url="http://10.0.0.1:8000/v1", model="m").urls == ["http://10.0.0.1:8000/v1"]

    with pytest.raises(ValidationError, match="an empty list names no server"):
        RemoteConfig(base_url=[], model="m")
    with pytest.raises(ValidationError, match="'http://10.0.0.1:8000/v1' is listed twice"):
        RemoteConfig(base_url=["http://10.0.0.1:8000/v1", "http://10.0.0.1:8000/v1"], model="m")
    # the same server written two ways (default port, trailing slash), one of them with a password
    with pytest.raises(ValidationError, match=r"are the same server") as twice:
        RemoteConfig(base_url=["http://u:hunter22@h/v1", "http://h:80/v1/"], model="m")
    assert "'http://u:***@h/v1' and 'http://h:80/v1/' are the same server" in str(twice.value)
    with pytest.raises(ValidationError, match="'ftp://h' is not an http"):
        RemoteConfig(base_url=["http://10.0.0.1:8000/v1", "ftp://h"], model="m")


def test_the_cli_refuses_a_duplicate_fleet_in_one_line_without_echoing_a_password(tmp_path):
    instructions = tmp_path / "i.jsonl"
    instructions.write_text(json.dumps({"instruction": "hi"}) + "\n")
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(yaml.safe_dump({"instructions": str(instructions), "out": str(tmp_path / "run"), "teachers": [
        {"name": "f", "backend": "openai",
         "remote": {"base_url": ["http://u:hunter22@h/v1", "http://u:hunter22@h/v1"], "model": "m"}}]}))
    result = CliRunner().invoke(app, ["generate", "--config", str(cfg)])
    assert result.exit_code == 2, result.output
    assert "listed twice" in result.output and "http://u:***@h/v1" in result.output
    assert "hunter22" not in result.output
    assert not (tmp_path / "run").exists()


def test_fleet_identity_ignores_its_servers_and_single_url_identity_is_unchanged():
    a, b, c = "http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1", "http://10.0.0.3:8000/v1"
    two = RemoteConfig(base_url=[a, b], model="Qwen/Qwen2.5-72B-Instruct")
    three = RemoteConfig(base_url=[a, b, c], model="Qwen/Qwen2.5-72B-Instruct", concurrency=64)
    assert two.identity() == three.identity() == RemoteConfig(base_url=[c], model=two.model).identity()
    assert two.identity() == {"model": "Qwen/Qwen2.5-72B-Instruct", "fleet": True}
    assert RemoteConfig(base_url=[a, b], model="other").identity() != two.identity()
    # one URL: byte-for-byte what runs made before fleets existed hashed into their rows' settings digest
    single = RemoteConfig(base_url="http://alice:pw@127.0.0.1:8000/v1?api-key=k", model="my-model")
    assert single.identity() == {"base_url": "http://alice:***@127.0.0.1:8000/v1?api-key=***", "model": "my-model"}
    assert json.dumps(single.identity()) == ('{"base_url": "http://alice:***@127.0.0.1:8000/v1?api-key=***", '
                                             '"model": "my-model"}')
    assert sha256_json(RemoteConfig(base_url=a, model="m").identity()) == sha256_json(
        {"base_url": "http://10.0.0.1:8000/v1", "model": "m"})


def test_the_token_limit_field_is_chosen_per_server():
    openai_api = make_client(RemoteConfig(base_url="https://api.openai.com/v1", model="gpt-4o"))
    local = make_client(RemoteConfig(base_url=["http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1"], model="m"))
    forced = make_client(RemoteConfig(base_url="http://10.0.0.1:8000/v1", model="m",
                                      token_limit_param="max_completion_tokens"))
    assert [s.token_param for s in openai_api.servers] == ["max_completion_tokens"]
    assert [s.token_param for s in local.servers] == ["max_tokens", "max_tokens"]
    assert [s.token_param for s in forced.servers] == ["max_completion_tokens"]


# --- Retry-After ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["Retry-After: 1", "retry-after-ms: 1000", "Retry-After: <HTTP date in 2 s>"])
def test_a_429_with_retry_after_is_waited_out(header):
    name, value = header.split(": ")

    def respond(number, body):
        if number > 0:
            return 200, completion_body(), {}
        wait = email.utils.formatdate(time.time() + 2, usegmt=True) if value.startswith("<") else value
        return 429, error_body("slow down"), {name: wait}

    with scripted_server(respond) as (url, seen):
        stats = RequestStats()
        started = time.monotonic()
        response = ask(fast(url), stats)  # backoff_s=0.01: only the header can make it wait a second
        elapsed = time.monotonic() - started
    assert response["choices"][0]["message"]["content"] == "hello"
    assert 0.99 <= elapsed < 4.0
    assert stats.as_dict() == {"requests": 2, "retries": 1, "failures": 0}
    assert len(seen.requests) == 2


def test_a_503_retry_after_is_capped(monkeypatch):
    monkeypatch.setattr(remote, "MAX_RETRY_AFTER_S", 0.5)

    def respond(number, body):
        return (503, error_body("loading"), {"Retry-After": "3600"}) if number == 0 else always_ok(number, body)

    with scripted_server(respond) as (url, _):
        stats = RequestStats()
        started = time.monotonic()
        ask(fast(url), stats)
        elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 3.0
    assert stats.as_dict() == {"requests": 2, "retries": 1, "failures": 0}


def test_a_fleet_sends_a_request_told_to_wait_to_another_server_at_once():
    def busy(number, body):
        return 429, error_body("queue full"), {"Retry-After": "30"}

    with scripted_server(busy) as (url_a, seen_a), scripted_server(always_ok) as (url_b, seen_b):
        gen = OpenAICompatibleGenerator(fast([url_a, url_b], concurrency=1))
        started = time.monotonic()
        done = dict(gen.generate(PROMPTS[:4], DecodingConfig(max_new_tokens=4)))
        elapsed = time.monotonic() - started
    assert sorted(done) == [0, 1, 2, 3]
    assert elapsed < 5.0  # nobody waited the 30 s: A was left out and B answered
    assert len(seen_a.requests) == 1 and len(seen_b.requests) == 4
    assert {cs[0].extra["server"] for cs in done.values()} == {url_b}
    assert gen.stats == {"requests": 5, "retries": 1, "failures": 0}


# --- failover ------------------------------------------------------------------------------------------------


def test_a_server_that_does_not_answer_is_left_out_and_its_request_goes_to_another():
    dead = closed_url()
    with scripted_server(always_ok) as (url_b, seen_b):
        gen = OpenAICompatibleGenerator(fast([dead, url_b], concurrency=2, max_retries=0))
        done = dict(gen.generate(PROMPTS[:6], DecodingConfig(max_new_tokens=4)))
    assert sorted(done) == list(range(6))
    assert {cs[0].extra["server"] for cs in done.values()} == {url_b}
    assert len(seen_b.requests) == 6
    # the dead server was tried by the first requests only (each failed at once, costing no retry), then left out
    stats = gen.stats
    assert 1 <= stats["retries"] <= 2 and stats["requests"] == 6 + stats["retries"] and stats["failures"] == 0


def test_when_the_whole_fleet_is_down_the_error_names_every_server_masked():
    dead_a, dead_b = closed_url("alice:hunter22@"), closed_url()
    stats = RequestStats()
    with pytest.raises(RemoteError) as failure:
        ask(fast([dead_a, dead_b], max_retries=1), stats)
    message = str(failure.value)
    assert "\n" not in message
    assert "gave up after 3 attempts on the fleet" in message
    assert redact_url(dead_a) in message and dead_b in message and "connection error" in message
    assert "hunter22" not in message and "alice:***@" in message
    assert stats.as_dict() == {"requests": 3, "retries": 2, "failures": 1}


# --- client errors, max_completion_tokens -------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, body, shown",
    [
        (404, error_body("The model `nope` does not exist."), "HTTP 404: The model `nope` does not exist."),
        (422, {"detail": [{"loc": ["body", "messages"], "msg": "Field required", "type": "missing"}]},
         "HTTP 422: body.messages: Field required"),
    ],
)
def test_a_client_error_names_the_servers_message_and_is_sent_once(status, body, shown):
    with scripted_server(lambda number, request: (status, body, {})) as (url, seen):
        stats = RequestStats()
        with pytest.raises(RemoteError) as failure:
            ask(fast(url), stats)
    assert str(failure.value) == f"{url} refused the request ({shown}); not retried"
    assert len(seen.requests) == 1
    assert stats.as_dict() == {"requests": 1, "retries": 0, "failures": 1}


def test_a_408_is_retried():
    with scripted_server(lambda n, b: (408, error_body("timeout"), {}) if n == 0 else always_ok(n, b)) as (url, seen):
        stats = RequestStats()
        ask(fast(url), stats)
    assert stats.as_dict() == {"requests": 2, "retries": 1, "failures": 0}


REFUSE_MAX_TOKENS = ("Unsupported parameter: 'max_tokens' is not supported with this model. "
                     "Use 'max_completion_tokens' instead.")


def refuses_max_tokens(number, body):
    if "max_completion_tokens" not in body:
        return 400, error_body(REFUSE_MAX_TOKENS), {}
    return 200, completion_body(), {}


def test_auto_moves_to_max_completion_tokens_once_when_the_server_refuses_max_tokens():
    with scripted_server(refuses_max_tokens) as (url, seen):
        gen = OpenAICompatibleGenerator(fast(url, concurrency=1))
        done = dict(gen.generate(PROMPTS[:3], DecodingConfig(max_new_tokens=7)))
    assert sorted(done) == [0, 1, 2]
    first, second, *rest = seen.requests
    assert first["max_tokens"] == 7 and "max_completion_tokens" not in first
    assert second["max_completion_tokens"] == 7 and "max_tokens" not in second
    assert second["messages"] == first["messages"]  # the same request, sent again
    assert len(rest) == 2 and all(r["max_completion_tokens"] == 7 and "max_tokens" not in r for r in rest)
    assert gen.stats == {"requests": 4, "retries": 0, "failures": 0}  # the resend is neither a retry nor a failure


def test_an_explicit_max_tokens_is_not_switched():
    with scripted_server(refuses_max_tokens) as (url, seen):
        stats = RequestStats()
        with pytest.raises(RemoteError, match="HTTP 400: Unsupported parameter: 'max_tokens'.*not retried"):
            ask(fast(url, token_limit_param="max_tokens"), stats)
    assert len(seen.requests) == 1 and stats.as_dict()["failures"] == 1


# --- generate through the CLI -------------------------------------------------------------------------------------


def _fleet_config(tmp_path, questions: list[str], urls: list[str], **remote_settings: Any):
    instructions = tmp_path / "instructions.jsonl"
    instructions.write_text("".join(json.dumps({"instruction": q}) + "\n" for q in questions))
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(yaml.safe_dump({
        "instructions": str(instructions), "out": str(tmp_path / "run"), "decoding": {"max_new_tokens": 8},
        "teachers": [{"name": "fleet", "backend": "openai",
                      "remote": {"base_url": urls, **remote_settings}}]}))  # fmt: skip
    return cfg


def _rows(path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_generate_with_a_fleet_records_each_rows_server_masked_and_keeps_rows_when_servers_change(tmp_path):
    secret = "hunter22-secret"
    with scripted_server(always_ok) as (url_a, _), scripted_server(always_ok) as (url_b, _):
        url_a = url_a.replace("http://", f"http://alice:{secret}@")
        cfg = _fleet_config(tmp_path, QUESTIONS[:6], [url_a, url_b], model="fake", concurrency=1)
        result = CliRunner().invoke(app, ["generate", "--config", str(cfg)])
        assert result.exit_code == 0, result.output
        rows = _rows(tmp_path / "run" / "responses" / "fleet.jsonl")
        assert len(rows) == 6
        assert set(Counter(r["server"] for r in rows)) == {redact_url(url_a), url_b}
        assert rows[0]["teacher"]["base_url"] == [redact_url(url_a), url_b]
        written = "".join(p.read_text() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != ".lock")
        assert "alice:***@" in written and secret not in written and secret not in result.output
        resolved = yaml.safe_load((tmp_path / "run" / "config.resolved.yaml").read_text())
        assert resolved["teachers"][0]["remote"]["base_url"] == [redact_url(url_a), url_b]

        # one more server in the fleet: the same endpoint, so every row is reused
        with scripted_server(always_ok) as (url_c, seen_c):
            cfg = _fleet_config(tmp_path, QUESTIONS[:6], [url_a, url_b, url_c], model="fake", concurrency=1)
            again = CliRunner().invoke(app, ["generate", "--config", str(cfg)])
    assert again.exit_code == 0, again.output
    assert seen_c.requests == []  # a changed settings digest would have sent C its share of 6 prompts
    assert _rows(tmp_path / "run" / "responses" / "fleet.jsonl") == rows


# --- a fleet of real llama.cpp servers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_gguf():
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not installed (pip install 'llama-cpp-python[server]')")
    from teacherfit.models import packaged_gguf_path

    return packaged_gguf_path("smollm2-135m-instruct")


@pytest.mark.slow
def test_a_llama_cpp_fleet_shares_the_prompts_and_finishes_when_a_server_dies(smollm2_gguf, tmp_path):
    from servers import llama_cpp_server

    processes: list = []
    with ExitStack() as stack:
        url_a, url_b = (stack.enter_context(llama_cpp_server(smollm2_gguf, model_alias="smollm2", threads=1,
                                                             on_start=processes.append)) for _ in range(2))
        # 1. both servers answer a share, every prompt once
        gen = OpenAICompatibleGenerator(RemoteConfig(base_url=[url_a, url_b], model="smollm2", concurrency=1))
        done = dict(gen.generate(PROMPTS, DecodingConfig(max_new_tokens=8)))
        assert sorted(done) == list(range(len(PROMPTS)))
        shares = Counter(cs[0].extra["server"] for cs in done.values())
        assert set(shares) == {url_a, url_b} and min(shares.values()) >= 4, shares
        assert gen.stats == {"requests": 16, "retries": 0, "failures": 0}
        assert gen.provenance()["server_model"]["id"] == "smollm2"

        # 2. `teacherfit generate` on the same fleet; server B is killed once a few rows exist
        cfg = _fleet_config(tmp_path, QUESTIONS, [url_a, url_b], model="smollm2", concurrency=1, timeout_s=60)
        partial = tmp_path / "run" / "responses" / "fleet.partial.jsonl"
        killed_at: list[int] = []

        def kill_b_after_four_rows() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and len(_rows(partial)) < 4:
                time.sleep(0.02)
            processes[1].kill()
            processes[1].wait()
            killed_at.append(len(_rows(partial)))

        killer = threading.Thread(target=kill_b_after_four_rows, daemon=True)
        killer.start()
        started = time.monotonic()
        result = CliRunner().invoke(app, ["generate", "--config", str(cfg)])
        seconds = time.monotonic() - started
        killer.join(timeout=10)
    assert result.exit_code == 0, result.output
    assert processes[1].returncode is not None and killed_at
    rows = _rows(partial)
    final = _rows(tmp_path / "run" / "responses" / "fleet.jsonl")
    # every instruction answered exactly once: nothing lost, nothing twice (in the final set and the partial file)
    assert [r["messages"][0]["content"] for r in final] == QUESTIONS
    assert len(rows) == len(QUESTIONS) and len({r["id"] for r in rows}) == len(QUESTIONS)
    assert {r["id"] for r in rows} == {r["id"] for r in final}
    servers = [r["server"] for r in rows]
    assert url_b in servers[: killed_at[0]]  # B answered before it died ...
    assert servers[killed_at[0]:].count(url_b) <= 1  # ... and at most the answer it had sent as it was killed
    assert len(rows) - killed_at[0] >= 8  # the run went on without it, on A
    # greedy, the same weights: each answer is the one either server gave in part 1
    assert {r["messages"][0]["content"]: r["messages"][-1]["content"] for r in final} == {
        QUESTIONS[i]: cs[0].text for i, cs in done.items()}
    print(f"fleet CLI run with a server killed after {killed_at[0]} rows: {seconds:.1f} s")
