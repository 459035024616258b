"""Validated configs, one per phase, loaded from YAML with CLI overrides.

Defaults live here and only here (the example YAML files set only what they change). Every run writes
the resolved config next to its outputs, so a run directory says exactly what produced it.

Overrides use dotted keys with YAML values: ``--set beta=0.5 --set reward.model=qwen2.5-coder-0.5b-instruct``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from teacherfit.store import atomic_write_text


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the field."""


# Settings of the backends and methods, defined here so that loading a config imports nothing heavy
# (no torch, openai, numpy): `generation`, `remote` and `metrics` import them from here.

DEFAULT_BETA: float = 1.0
"""Weight of the compatibility term in CAR.

The paper's value is not confirmed (docs/papers.md section 1.2): 1.0 is a neutral placeholder that gives loss a
visible effect at typical token losses (about 0.5 to 2 nats). Fit it to observed outcomes with
``calibrate_beta`` / ``loo_calibrated_car`` when outcomes exist.
"""


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


class VLLMEngineConfig(BaseModel):
    """vLLM engine settings for one teacher (``backend: vllm``), checked before the engine starts.

    The named fields are the ones a large teacher needs; ``engine_args`` passes any other field of vLLM's
    ``EngineArgs`` (``vllm.EngineArgs``, the keyword arguments of ``vllm.LLM``), checked against the
    installed vLLM's own field list.
    """

    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one copy of the model is split across (a 70B "
                                      "teacher in bf16: 4-8 GPUs of 80 GB).")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages (GPUs used = tensor x pipeline).")
    max_model_len: int | None = Field(None, ge=16, description="Context length the engine reserves KV cache for "
                                      "(default: the model's own; lower it when the KV cache does not fit).")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="Share of each GPU's memory vLLM "
                                          "may take (weights + KV cache).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="Weights and activations "
                                                                   "dtype ('auto': the checkpoint's).")
    quantization: str | None = Field(None, description="vLLM quantization method (e.g. 'fp8', 'awq', 'gptq'); "
                                     "None: as the checkpoint says.")
    seed: int = Field(0, description="Engine seed (each request also carries decoding.seed).")
    enforce_eager: bool = Field(False, description="No CUDA graphs: slower, less memory, faster start.")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="Any other vLLM EngineArgs field, "
                                        "e.g. {enable_prefix_caching: true, max_num_seqs: 256}.")
    chunk_size: int = Field(512, ge=1, description="Prompts per engine call; each chunk's rows are written as it "
                            "finishes (a killed run loses at most one chunk; the progress bar moves per chunk).")

    # What the settings digest of the rows leaves out: how the work is spread and scheduled, not what it computes.
    RESOURCE_FIELDS: ClassVar[tuple[str, ...]] = ("tensor_parallel_size", "pipeline_parallel_size",
                                                  "gpu_memory_utilization", "enforce_eager", "chunk_size")

    def engine_kwargs(self, *, fields: set[str] | None = None, where: str = "vllm") -> dict[str, Any]:
        """The keyword arguments for ``vllm.LLM``. ``fields``: the installed vLLM's ``EngineArgs`` field names;
        every key must be one of them. Raises ``ValueError`` naming the config field."""
        typed = self.model_dump(exclude={"engine_args", "chunk_size"}, exclude_none=True)
        both = sorted(set(typed) & set(self.engine_args))
        if both:
            raise ValueError(f"{where}.engine_args: {', '.join(both)} has its own field ({where}.{both[0]}); set it there")
        kwargs = {**typed, **self.engine_args}
        if fields is not None:
            for key in kwargs:
                if key not in fields:
                    import difflib

                    close = difflib.get_close_matches(key, sorted(fields), n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ValueError(f"{where}.engine_args: {key!r} is not a field of the installed vLLM's EngineArgs"
                                     f"{hint}; see the vLLM engine arguments documentation")
        return kwargs

    def digest_fields(self) -> dict[str, Any]:
        """What shapes the responses (hashed into the rows' settings digest)."""
        return self.model_dump(exclude=set(self.RESOURCE_FIELDS))


# Local servers (llama.cpp, vLLM without --api-key) accept any key, but the client insists on one.
PLACEHOLDER_KEY = "EMPTY"
MAX_RETRY_AFTER_S = 120.0  # the longest a server's Retry-After makes one retry wait


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


def _check_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ValueError(f"{redact_url(url)!r} is not a URL; e.g. http://127.0.0.1:8000/v1") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{redact_url(url)!r} is not an http(s) URL with a host; e.g. http://127.0.0.1:8000/v1")
    return url


def _same_server(url: str) -> tuple[Any, ...]:
    """What makes two URLs one server: scheme, host, port, path (trailing slash ignored) and query."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/"), parts.query


class RemoteConfig(BaseModel):
    """Where the OpenAI-compatible server (or fleet of servers) is and how hard to push it."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | list[str] = Field(
        description='Server root including the API prefix, e.g. "http://127.0.0.1:8000/v1"; or a list of them: '
        "a fleet of servers that all serve the same model, each request going to the least busy one that is up."
    )
    model: str = Field(description="Model name the server expects in each request.")
    api_key_env: str | None = Field(
        None,
        description="Name of the environment variable holding the API key. Unset: no key is sent "
        f"({PLACEHOLDER_KEY!r}, which local servers accept), except OPENAI_API_KEY to api.openai.com.",
    )
    concurrency: int = Field(8, ge=1, description="Most requests in flight at once per server (per URL of "
                             "base_url): a fleet of 4 URLs with concurrency 8 has up to 32 in flight.")
    timeout_s: float = Field(120.0, gt=0.0, description="Seconds before one request counts as failed.")
    max_retries: int = Field(4, ge=0, description="Retries per request on connection errors, timeouts, 408, 409, "
                             "429 and 5xx. Moving a request away from a fleet's server that did not answer or said Retry-After, "
                             "to another that is up, costs none.")
    backoff_s: float = Field(0.5, ge=0.0, description="First retry delay; doubles per retry, with jitter. A 429 or "
                             f"503 that says Retry-After waits that long instead (at most {MAX_RETRY_AFTER_S:g} s).")
    cooldown_s: float = Field(30.0, ge=0.0, description="Seconds a server that did not answer (connection error, "
                              "timeout) is left out of a fleet before it is asked again.")
    token_limit_param: Literal["auto", "max_tokens", "max_completion_tokens"] = Field(
        "auto",
        description="The request field that carries the token limit. auto: max_completion_tokens to "
        "api.openai.com, max_tokens elsewhere, switching to max_completion_tokens (once) when a server refuses "
        "max_tokens with a 400 that says so.",
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, str):
            return _check_url(v)
        if not v:
            raise ValueError("an empty list names no server; give one URL, or a list of the URLs of servers that "
                             "serve the same model, e.g. [http://10.0.0.1:8000/v1, http://10.0.0.2:8000/v1]")
        seen: dict[tuple[Any, ...], str] = {}
        for url in v:
            key = _same_server(_check_url(url))
            if key in seen:
                twice = (f"{redact_url(url)!r} is listed twice" if url == seen[key] else
                         f"{redact_url(seen[key])!r} and {redact_url(url)!r} are the same server")
                raise ValueError(f"{twice}; list each server once (`concurrency` sets how many requests each "
                                 "one gets at once)")
            seen[key] = url
        return v

    @property
    def urls(self) -> list[str]:
        """The servers: ``[base_url]``, or the fleet's URLs."""
        return [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)

    @property
    def is_fleet(self) -> bool:
        """``base_url`` is a list (even of one URL)."""
        return not isinstance(self.base_url, str)

    def shown_urls(self) -> str:
        """The URLs, masked, for messages: one, or all of a fleet's comma-separated."""
        return ", ".join(redact_url(url) for url in self.urls)

    def identity(self) -> dict[str, Any]:
        """What this endpoint is, safe to write, log or hash into an id: the masked URL and the model name.

        A fleet is its model name only (and ``fleet: True``): its servers all serve that model, so adding or
        removing a server is the same endpoint, and a generate run keeps its rows instead of regenerating them.
        """
        if self.is_fleet:
            return {"model": self.model, "fleet": True}
        return {"base_url": redact_url(self.base_url), "model": self.model}

    def key_env(self, url: str | None = None) -> str | None:
        """The variable the key is read from: the one the config names, or OPENAI_API_KEY for OpenAI's API.

        ``url``: the key for that server; None: the key any of the servers gets.
        """
        if self.api_key_env:
            return self.api_key_env
        urls = [url] if url else self.urls
        return "OPENAI_API_KEY" if any((urlsplit(u).hostname or "") in OPENAI_HOSTS for u in urls) else None

    def check_key(self) -> None:
        """Raise ``RemoteError`` when the config names a key variable that is not set (before any request)."""
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise RemoteError(f"remote.api_key_env: the environment variable {self.api_key_env} is not set; "
                              f"export it, or remove api_key_env for a server that needs no key")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelOptions(Strict):
    """Where and how models load: device, dtype, remote code."""

    device: str = Field("auto", description="'auto' (CUDA if available, else CPU), 'cpu', 'cuda', 'cuda:1'...")
    dtype: str = Field("auto", description="'auto' = fp32 on CPU, bf16 on CUDA; or float32 / bfloat16 / float16.")
    trust_remote_code: bool = Field(False, description="Run model code from the hub. Off unless you ask.")


class TeacherConfig(Strict):
    """A candidate teacher: a model to generate with, a server to ask, or an existing response set."""

    name: str = Field(description="Short unique name used in file names and reports.")
    backend: Literal["transformers", "openai", "vllm", "file"] = Field(
        "transformers", description="'transformers' (in process), 'vllm' (in process, GPU), 'openai' (any "
        "OpenAI-compatible server, `remote`), 'file' (an existing response set, `responses`).")
    model: str | None = Field(None, description="Hub id, folder, .gguf file or packaged model name.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of `model`.")
    responses: Path | None = Field(None, description="backend 'file': an existing response set to use as is.")
    remote: RemoteConfig | None = Field(None, description="backend 'openai': the server to ask.")
    batch_size: int = Field(16, ge=1, description="transformers backend: prompts per batch.")
    decoding: DecodingConfig | None = Field(None, description="Overrides the run's decoding for this teacher.")
    vllm: VLLMEngineConfig | None = Field(None, description="backend 'vllm': engine settings (tensor_parallel_size, "
                                          "max_model_len, gpu_memory_utilization, dtype, quantization, engine_args, ...).")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\:*?\"<>| "):
            raise ValueError("use letters, digits, '.', '-' or '_' (it names files)")
        return v

    def check_backend(self) -> None:
        need = {"transformers": "model", "vllm": "model", "openai": "remote", "file": "responses"}[self.backend]
        if getattr(self, need) is None:
            raise ConfigError(f"teacher {self.name!r}: backend {self.backend!r} needs `{need}`")
        if self.vllm is not None and self.backend != "vllm":
            raise ConfigError(f"teacher {self.name!r}: `vllm` engine settings need backend 'vllm' (it is {self.backend!r})")

    @property
    def engine(self) -> VLLMEngineConfig:
        """The vLLM engine settings (defaults when the config gives none)."""
        return self.vllm or VLLMEngineConfig()


class RewardConfig(Strict):
    """Where the reward r comes from."""

    kind: Literal["judge", "classifier", "openai_judge"] = Field(
        "judge",
        description="'judge': a local causal LM, probability-weighted 1-10 score from one forward pass; "
        "'classifier': a sequence-classification reward model (Skywork-Reward, ArmoRM-style); "
        "'openai_judge': a judge behind an OpenAI-compatible endpoint.",
    )
    model: str | None = Field("qwen2.5-coder-0.5b-instruct", description="Model for 'judge' / 'classifier'.")
    remote: RemoteConfig | None = None
    max_length: int = Field(1024, ge=32, description="Tokens of judge/RM input kept (instruction + response).")
    max_tokens: int = Field(4096, ge=64, description="Token budget per scoring batch.")
    device_map: Literal[None, "auto"] = Field(
        None, description="'auto': load the classifier/judge with transformers' device_map=\"auto\" across all "
        "visible GPUs (a reward model that does not fit one device); one process only (not under accelerate "
        "launch / torchrun with several processes). models.device=cpu keeps it on the CPU.")

    @model_validator(mode="after")
    def _remote_for_api(self) -> RewardConfig:
        if self.kind == "openai_judge" and self.remote is None:
            raise ValueError("kind 'openai_judge' needs `remote` (base_url, model)")
        if self.kind == "openai_judge" and self.device_map is not None:
            raise ValueError("device_map places a local judge or classifier; kind 'openai_judge' loads no model")
        return self


class GenerateConfig(Strict):
    """`teacherfit generate`: instructions x teachers -> one response set per teacher."""

    instructions: Path = Field(description="Instruction set: JSONL/JSON/Parquet in Alpaca, ShareGPT or messages format.")
    format: Literal["auto", "alpaca", "sharegpt", "messages"] = Field(
        "auto", description="Row format of the data; 'auto' detects it from the first rows.")
    on_error: Literal["stop", "skip"] = Field("stop", description="Malformed rows: stop (default) or skip and count.")
    limit: int | None = Field(None, ge=1, description="Use only the first N instructions.")
    teachers: list[TeacherConfig] = Field(min_length=1)
    decoding: DecodingConfig = DecodingConfig()
    best_of_n_reward: RewardConfig | None = Field(
        None, description="With decoding.n > 1: keep the candidate this reward scores highest (rejection sampling)."
    )
    max_prompt_tokens: int = Field(2048, ge=8, description="Longer prompts are counted, reported and not generated.")
    worker_process: Literal["auto", "always", "never"] = Field(
        "auto", description="Generate each model teacher in its own process, so its (GPU) memory is returned before the "
        "next teacher or the reward model loads: 'auto' for vLLM teachers, 'always' for transformers teachers too.")
    models: ModelOptions = ModelOptions()
    out: Path | None = Field(None, description="Run directory; re-running with the same one resumes.")


class ResponseSetConfig(Strict):
    """A teacher's response set: the file `generate` writes, or any instruction file with responses."""

    name: str = Field(description="The teacher's name in reports and file names.")
    path: Path = Field(description="JSONL/JSON/Parquet file (Alpaca, ShareGPT or messages format, with responses).")


class GraceConfig(Strict):
    """GRACE (Panigrahi et al., ICLR 2026): a teacher score from the student's per-example gradients on its responses.

    One forward and backward pass of the untuned student per (teacher, instruction) on the first `instructions`
    instructions, each gradient projected to `dim` numbers; the score is computed from the projections as the
    authors' code does (`teacherfit.metrics.grace_score`). Lower is better."""

    enabled: bool = Field(True, description="Compute GRACE (a backward pass per row; off: rank skips it).")
    instructions: int | None = Field(512, ge=4, description="Instructions scored per teacher (the first N answered "
                                     "by every teacher; null: all). The authors used 512.")
    dim: int = Field(512, ge=8, le=32767, description="Projected gradient size (the authors' default 512).")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="Share of instructions held out in each split.")
    n_splits: int = Field(10, ge=1, description="Random train/held-out splits averaged.")
    smooth: float = Field(1e-3, ge=0, le=1, description="Eigenvalue smoothing towards the mean eigenvalue.")
    seed: int = Field(0, description="Seed of the random projection.")


class RankConfig(Strict):
    """`teacherfit rank`: CAR and the baselines per teacher for one student."""

    responses: list[ResponseSetConfig] = Field(
        default_factory=list, description="Teachers' response sets (or give `generate_run`)."
    )
    generate_run: Path | None = Field(None, description="A `teacherfit generate` run directory to rank.")
    student: str = Field(description="The untuned student base model (hub id, folder, .gguf or packaged name).")
    reference_lm: str | None = Field(
        "smollm2-135m-instruct", description="Fixed small LM for the PPL/IFD baselines (the paper used GPT-2)."
    )
    reward: RewardConfig = RewardConfig()
    reward_2: RewardConfig | None = Field(
        None, description="A second, different reward source scored beside `reward` (metrics reward_2 and car_2): a "
        "study judges its outcome with another model, so the selection signal can be told from the evaluation signal.")
    grace: GraceConfig = Field(GraceConfig(), description="GRACE, the gradient-based teacher score.")
    beta: float = Field(DEFAULT_BETA, ge=0, description="CAR = r / (1 + beta * L).")
    car_variant: Literal["auto", "plain", "sign_safe"] = Field(
        "auto", description="'auto': plain when every reward is positive, else the sign-safe variant."
    )
    max_length: int = Field(2048, ge=16, description="Tokens per (instruction, response) example; longer ones are counted.")
    max_tokens: int = Field(4096, ge=64, description="Token budget per scoring batch (length-sorted batches).")
    format: Literal["auto", "alpaca", "sharegpt", "messages"] = Field(
        "auto", description="Row format of the response sets; 'auto' detects it.")
    on_error: Literal["stop", "skip"] = Field("stop", description="Malformed rows: stop (default) or skip and count.")
    limit: int | None = Field(None, ge=1, description="Use only the first N instructions answered by every teacher.")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for confidence intervals (0 = none).")
    pick_confidence: float = Field(
        0.95, gt=0.5, lt=1, description="The report names a teacher to use when the CAR leader beats the runner-up "
        "in at least this share of paired bootstrap resamples of the instructions; below it, it says no pick is supported.")
    seed: int = Field(0, description="Seed of the bootstrap resamples.")
    models: ModelOptions = ModelOptions()
    out: Path | None = Field(None, description="Run directory (default: runs/rank-<config digest>); re-run to resume.")


class CorrelateConfig(Strict):
    """`teacherfit correlate`: how well each rank metric predicted an observed outcome."""

    rank_run: Path = Field(description="A `teacherfit rank` run directory (its teachers.json).")
    outcomes: Path = Field(description="Observed outcome per teacher: JSON/YAML mapping, or CSV with teacher,outcome.")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for the correlations' 95% intervals (0 = none).")
    seed: int = Field(0, description="Seed of the bootstrap resamples.")
    out: Path | None = Field(None, description="Run directory (default: runs/correlate-<config digest>).")


class StudentInit(Strict):
    """Build the student from a subset of `student`'s layers (e.g. a half-depth copy of the teacher)."""

    layers: str | list[int] = Field(
        "every_other", description="'every_other' (half depth: layers 0, 2, 4, ...), 'first:N', or explicit layer indices."
    )


class LossWeights(BaseModel):
    """Weights of the loss terms (``KDConfig.weights``); ``total`` mixes per-token means into the logged loss."""

    ce: float
    pred: float
    attn: float

    def total(self, ce: float, kd: float, attn: float = 0.0) -> float:
        return self.ce * ce + self.pred * kd + self.attn * attn


class KDConfig(Strict):
    """L = (1 - lambda) * CE + lambda * (w_pred * L_pred + w_attn * L_attn); defaults as the paper's configs."""

    lambda_: float = Field(1.0, alias="lambda", ge=0, le=1, description="Weight of the KD terms against ground-truth CE.")
    temperature: float = Field(1.0, gt=0, description="tau; the divergence is computed at tau and scaled by tau^2.")
    w_pred: float = Field(1.0, ge=0, description="Weight of the prediction-layer (logit) KD term; 0 = off.")
    w_attn: float = Field(1.0, ge=0, description="Weight of the attention KD term; 0 = off.")
    divergence: Literal["forward_kl", "reverse_kl", "generalized_jsd", "skew_kl", "tvd", "sampled_reverse_kl"] = Field(
        "forward_kl", description="KL(p_T || p_S) (the paper's), reverse KL, generalized JSD (TRL GKD's, "
        "divergence_kwargs.beta), skew KL (DistiLLM's, divergence_kwargs.alpha), total variation, or "
        "sampled_reverse_kl: the per-token log-ratio log p_S - log p_T of the student's own sampled tokens as a "
        "policy-gradient advantage (on_policy: 1 only; the one a teacher that returns only the sampled tokens' "
        "log-probabilities can give).")
    on_policy: float = Field(0.0, ge=0, le=1, description="Share of each step's prompts whose responses the "
                             "student samples itself (`rollout`), from its live weights; TRL GKD's `lmbda`. 0: the "
                             "dataset's responses only (off-policy); 1: none of them. Not `kd.lambda` (the KD/CE mix).")
    divergence_kwargs: dict[str, float] = Field(default_factory=dict, description="e.g. {beta: 0.5} or {alpha: 0.1}.")
    layer_map: str | dict[int, int] | list[list[int]] = Field(
        "uniform", description="'uniform', 'last:N', or explicit {student_layer: teacher_layer}."
    )
    head_map: Literal["auto", "average", "one_to_one"] = Field(
        "auto", description="'auto': one-to-one when head counts match, else head-averaged maps."
    )
    query_chunk: int = Field(128, ge=1, description="Query positions per attention-map chunk.")
    head_chunk: int | None = Field(
        None, ge=1, description="Tokens per chunk of the LM head + loss; default: about 2^25 logits (128 MiB fp32) per chunk."
    )
    fused_head: bool = Field(
        True, description="Compute the head's gradients chunk by chunk in forward (no recompute); off: checkpointed chunks."
    )

    @model_validator(mode="after")
    def _sampled_needs_samples(self) -> KDConfig:
        if self.divergence == "sampled_reverse_kl":
            if self.on_policy != 1.0:
                raise ValueError("kd.divergence sampled_reverse_kl estimates KL(p_S || p_T) from the student's own "
                                 "samples: set kd.on_policy=1 (dataset responses are not the student's samples)")
            if self.temperature != 1.0:
                raise ValueError("kd.divergence sampled_reverse_kl scores the sampled tokens at temperature 1: "
                                 "set kd.temperature=1 (rollout.temperature sets how the student samples)")
        return self

    def weights(self) -> LossWeights:
        """The loss mix, decided here once: L = (1 - lambda) CE + lambda (w_pred L_pred + w_attn L_attn)."""
        return LossWeights(ce=1 - self.lambda_, pred=self.lambda_ * self.w_pred, attn=self.lambda_ * self.w_attn)

    def chunk_for(self, vocab: int) -> int:
        """head_chunk, or the default for this vocabulary size: 2^25 logits per chunk, within [32, 4096] tokens."""
        return self.head_chunk or max(32, min(4096, 2**25 // vocab))

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class LoraOptions(Strict):
    """Train LoRA adapters (peft) instead of every weight; the merged model is saved."""

    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (the update is scaled by alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[str] | str = Field("all-linear", description="peft target_modules.")


# Experiment trackers `train.report_to` may name (accelerate's), and the module each needs installed.
TRACKERS: dict[str, str] = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow",
                            "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive",
                            "swanlab": "swanlab"}


def resolve_report_to(value: str | list[str]) -> list[str]:
    """``train.report_to`` as a list of installed tracker names: 'none' -> [], 'all' -> every installed one; a
    named tracker that is not installed is an error that says how to install it (before any model loads)."""
    import importlib.util

    names = [value] if isinstance(value, str) else list(value)
    if names in (["none"], []):
        return []
    if names == ["all"]:
        return [n for n, module in TRACKERS.items() if importlib.util.find_spec(module) is not None]
    for name in names:
        if name not in TRACKERS:
            import difflib

            close = difflib.get_close_matches(name, TRACKERS, n=1)
            raise ValueError(f"unknown tracker {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                             f"use 'none', 'all' or names among {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ValueError(f"{name} is not installed: `pip install {name}`, or leave it out of train.report_to")
    return list(dict.fromkeys(names))


class TrainOptions(Strict):
    """The optimisation: AdamW, linear warm-up then cosine decay, checkpoints."""

    lr: float = Field(2e-5, gt=0, description="Peak learning rate (TRL: learning_rate).")
    epochs: float = Field(2.0, gt=0, description="Passes over the data (the paper: 2).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(4, ge=1, description="Examples per micro-batch (per process).")
    grad_accum: int = Field(8, ge=1, description="Micro-batches per optimizer step.")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up, then cosine decay to 0.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (the paper: 0.1 for KD, 0 for DAE).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradients are clipped to this global norm.")
    max_length: int = Field(2048, ge=16, description="Tokens per training example; longer ones are truncated and counted.")
    seed: int = Field(0, description="Seed of the data order, the initialisation of new weights and sampling.")
    checkpoint_every: int = Field(50, ge=1, description="Optimizer steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints kept on disk.")
    log_every: int = Field(1, ge=1, description="Optimizer steps between log lines (train_log.jsonl, report_to).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute the student decoder's activations in backward (less memory, ~1/3 more student compute)."
    )
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the saved model; 'auto' = the dtype training computed in (bf16 on GPUs with bf16, "
        "fp32 on the CPU).")
    report_to: str | list[str] = Field(
        "none", validate_default=True, description="Experiment trackers for the training metrics, besides log.jsonl (as Transformers' "
        "report_to): 'none', 'all' (every installed one), or names among " + ", ".join(TRACKERS) + " (accelerate's "
        "trackers; the package must be installed).")

    @field_validator("report_to")
    @classmethod
    def _trackers(cls, v: str | list[str]) -> list[str]:
        return resolve_report_to(v)


class RolloutOptions(Strict):
    """On-policy rollouts (``kd.on_policy`` > 0): how the student samples its own responses during training."""

    engine: Literal["transformers", "openai", "vllm"] = Field(
        "transformers", description="'transformers': the training student itself, batched generate (CPU and GPU; "
        "LoRA included); 'openai': a server that serves the student (`remote`; keeping its weights current is "
        "yours, see the README); 'vllm': vLLM in process on a GPU, weights synced every `sync_every` steps.")
    max_new_tokens: int = Field(128, ge=1, description="Most tokens the student generates per response.")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature (1: the student's own distribution, "
                               "which sampled_reverse_kl needs; 0: greedy).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    buffer_steps: int = Field(1, ge=1, description="Rollouts of this many optimizer steps are generated in one batched "
                              "call at the first of them and used in turn: fewer, larger generate calls, at a staleness "
                              "of up to buffer_steps - 1 optimizer steps (logged as rollout_age).")
    batch_size: int | None = Field(None, ge=1, description="Prompts per generate call (transformers); default: all of "
                                   "a buffer's prompts in one call.")
    sync_every: int = Field(1, ge=1, description="vllm: optimizer steps between weight syncs into the engine.")
    remote: RemoteConfig | None = Field(None, description="engine 'openai': the server that serves the student.")
    vllm: VLLMEngineConfig | None = Field(None, description="engine 'vllm': engine settings.")

    @model_validator(mode="after")
    def _engine_settings(self) -> RolloutOptions:
        if self.engine == "openai" and self.remote is None:
            raise ValueError("rollout.engine 'openai' needs rollout.remote (base_url, model) of a server that serves "
                             "the student")
        if self.remote is not None and self.engine != "openai":
            raise ValueError(f"rollout.remote is for engine 'openai' (it is {self.engine!r})")
        if self.vllm is not None and self.engine != "vllm":
            raise ValueError(f"rollout.vllm is for engine 'vllm' (it is {self.engine!r})")
        return self

    def vllm_engine(self, max_length: int) -> VLLMEngineConfig:
        """engine 'vllm': the settings given, or the rollout default (a third of the training GPU, the training
        context)."""
        return self.vllm or VLLMEngineConfig(gpu_memory_utilization=0.3, max_model_len=max_length)

    def decoding(self, seed: int) -> DecodingConfig:
        return DecodingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=seed)


class ServerTeacherConfig(Strict):
    """A teacher behind an OpenAI-compatible server, scoring the student's token ids through the server's prompt
    log-probabilities (no teacher weights in this process)."""

    backend: Literal["openai"] = Field("openai", description="The server's API (OpenAI-compatible completions).")
    remote: RemoteConfig = Field(description="The server that serves the teacher.")
    server: Literal["vllm", "llama_cpp"] = Field(
        "vllm", description="'vllm' (`vllm serve`: prompt_logprobs, top-k by token id: forward KL with the cache's "
        "tail handling, or sampled_reverse_kl) or 'llama_cpp' (llama-cpp-python's server: echo + logprobs gives "
        "the sampled tokens' log-probabilities: sampled_reverse_kl only).")
    top_k: int = Field(20, ge=1, description="vllm: alternatives per position (forward_kl on the top-k).")


class TrainData(Strict):
    """The training set: response sets, or a rank run's per-instruction best."""

    responses: list[ResponseSetConfig] = Field(default_factory=list, description="Response sets to train on.")
    best_of_rank: Path | None = Field(
        None, description="A rank run: per instruction, the response of the teacher that `best_of_rank_rule` picks."
    )
    best_of_rank_rule: Literal["car", "grape"] = Field(
        "car", description="How best_of_rank picks per instruction: 'car' (the best per-sample CAR) or 'grape' (the "
        "response the student finds most likely per token, GRAPE's rule).")
    limit: int | None = Field(None, ge=1, description="Use only the first N training samples.")
    on_error: Literal["stop", "skip"] = Field("stop", description="Malformed rows: stop (default) or skip and count.")


class TrainingJob(Strict):
    """What every training command has: the student, its data, the loss, the optimisation, LoRA, models, run dir."""

    student: str = Field(description="Student model (hub id, folder, .gguf, packaged name).")
    teacher_device: str | None = Field(None, description="Device of online teachers (one process only; default: the "
                                       "student's, which is accelerate's device for this process).")
    data: TrainData
    kd: KDConfig = KDConfig()
    train: TrainOptions = TrainOptions()
    lora: LoraOptions | None = Field(None, description="Train LoRA adapters instead of every weight (unset: full fine-tune).")
    rollout: RolloutOptions = Field(RolloutOptions(), description="How the student samples its own responses when "
                                    "kd.on_policy > 0 (engine, decoding, generation buffer).")
    models: ModelOptions = ModelOptions()
    out: Path | None = Field(None, description="Run directory (default: runs/<command>-<config digest>); re-run to resume.")


class DistillConfig(TrainingJob):
    """`teacherfit distill`: L = (1 - lambda) CE + lambda (w_pred L_pred + w_attn L_attn)."""

    student_init: StudentInit | None = Field(None, description="Build the student from a subset of `student`'s layers.")
    teacher: str | ServerTeacherConfig | None = Field(None, description="Online teacher (frozen, eval mode): a model, "
                                                     "or {backend: openai, remote: ..., server: vllm|llama_cpp} for a "
                                                     "teacher behind a server (on-policy).")
    teacher_cache: Path | None = Field(None, description="Offline top-k cache from `cache-teacher` (no teacher loaded).")


class CacheTeacherConfig(Strict):
    """`teacherfit cache-teacher`: the teacher's top-k next-token log-probs for every response token."""

    teacher: str = Field(description="Teacher model whose top-k next-token distributions are cached.")
    data: TrainData
    top_k: int = Field(32, ge=1, description="Token ids kept per position.")
    max_length: int = Field(2048, ge=16, description="Tokens per example: use the training run's train.max_length.")
    examples_per_shard: int = Field(256, ge=1, description="Examples per safetensors shard (a resume redoes at most one).")
    max_tokens: int = Field(4096, ge=64, description="Token budget per forward batch.")
    models: ModelOptions = ModelOptions()
    out: Path | None = Field(None, description="The cache folder; re-run with the same one to resume.")


class RoutingConfig(Strict):
    """DAE routing: which samples take the domain expert's distribution (the rest: the reference model's)."""

    source: Literal["flag", "rules", "classifier"] = Field(
        "flag", description="'flag': a per-sample field of the data (the paper's way); 'rules': keywords/regexes "
        "on the text; 'classifier': logistic regression on sentence embeddings, trained on `labelled`.")
    field: str = Field("domain", description="flag: the row field that marks domain samples (true/false).")
    keywords: list[str] = Field(default_factory=list, description="rules: case-insensitive substrings; any match = domain.")
    patterns: list[str] = Field(default_factory=list, description="rules: regular expressions (re.search); any match = domain.")
    labelled: Path | None = Field(None, description="classifier: JSONL of {text, domain: true/false} (or any record "
                                  "format with a `domain` field): a few examples of each class.")
    embedder: str = Field("all-minilm-l6-v2", description="classifier: sentence encoder (the packaged MiniLM, a folder or hub id).")
    threshold: float = Field(0.5, gt=0, lt=1, description="classifier: P(domain) at or above this = domain.")
    ridge: float = Field(1e-2, ge=0, description="classifier: L2 penalty of the logistic regression.")
    text: Literal["instruction", "conversation"] = Field(
        "instruction", description="What rules and the classifier read: the user turns, or the whole conversation.")
    borderline: int = Field(10, ge=0, description="How many samples closest to the threshold the report lists.")


class HeldoutSets(Strict):
    """Held-out sets scored before and after `align`: the student's mean loss on each set's responses."""

    domain: Path | None = Field(None, description="Domain instructions with the expert's responses.")
    general: Path | None = Field(None, description="General instructions with the reference model's responses.")
    limit: int | None = Field(None, ge=1, description="Score only the first N of each set.")
    max_tokens: int = Field(4096, ge=64, description="Token budget per scoring batch.")


class AlignConfig(TrainingJob):
    """Domain Alignment from Expert: L = (1 - lambda) CE + lambda tau^2 KL(p* || p_S), p* routed per sample."""

    expert: str | None = Field(None, description="Frozen domain expert (same tokenizer as the student).")
    expert_cache: Path | None = Field(None, description="Or the expert's top-k cache from `cache-teacher` (not loaded).")
    reference: str | None = Field(None, description="Frozen general reference model. 'student': the student's own "
                                  "starting weights (a LoRA student with adapters off: no second copy in memory), "
                                  "so DAE keeps what the student already does on general samples.")
    reference_cache: Path | None = Field(None, description="Or the reference model's top-k cache from `cache-teacher`.")
    routing: RoutingConfig = RoutingConfig()
    domain_share: float | None = Field(None, gt=0, lt=1, description="Resample the training mix (seeded) to this "
                                       "share of domain samples, keeping the number of samples; unset: as routed.")
    heldout: HeldoutSets = HeldoutSets()
    kd: KDConfig = Field(KDConfig(w_attn=0.0), description="lambda, temperature, divergence; attention KD is not part of DAE.")
    train: TrainOptions = Field(TrainOptions(weight_decay=0.0), description="As distill's (the paper's DAE: weight decay 0).")
    evaluate: dict[str, Any] | None = Field(
        None, description="Optional `teacherfit evaluate` settings (without student): judged scores of the student "
        "before and after, side by side. Off when unset (judging is slow).")

    @field_validator("kd", "train", mode="before")
    @classmethod
    def _dae_defaults(cls, v: Any, info) -> Any:
        # DAE's own defaults (no attention KD; the paper's weight decay 0) also when a section is given in part
        key = {"kd": "w_attn", "train": "weight_decay"}[info.field_name]
        return {**v, key: 0.0} if isinstance(v, dict) and key not in v else v

    @field_validator("kd")
    @classmethod
    def _no_attention(cls, v: KDConfig) -> KDConfig:
        if v.w_attn > 0:
            raise ValueError("attention KD is not part of DAE: set kd.w_attn=0")
        return v


class QuickstartConfig(Strict):
    """The embedded default: everything small, on CPU, offline, with packaged models."""

    rank: RankConfig = Field(description="Phase 1: rank the teachers (as `teacherfit rank`).")
    distill: DistillConfig | None = Field(None, description="Phase 2: distill (as `teacherfit distill`); unset: skipped.")
    align: AlignConfig | None = Field(None, description="Phase 3: DAE (as `teacherfit align`); unset: skipped.")
    out: Path | None = Field(None, description="Run directory (default: runs/quickstart-<config digest>).")


class MTBenchOptions(Strict):
    """MT-Bench: two-turn questions, single-answer grading 1-10 (reference-guided for math, reasoning, coding)."""

    enabled: bool = Field(True, description="Grade the student on MT-Bench (false: skip this part).")
    questions: Path | None = Field(None, description="question.jsonl in MT-Bench's format; default: the packaged 80.")
    reference_answers: Path | None = Field(
        None, description="Reference answers in FastChat's answer format; default: the packaged GPT-4 answers.")
    judge_prompts: Path | None = Field(None, description="FastChat judge_prompts.jsonl; default: the packaged one.")
    categories: list[str] | None = Field(None, description="Keep only these categories.")
    question_ids: list[int] | None = Field(None, description="Keep only these question ids.")
    limit: int | None = Field(None, ge=1, description="Use only the first N questions (after the filters).")


class PairwiseOptions(Strict):
    """Win rate against a reference model's answers, judged in both orders; length-controlled too."""

    enabled: bool = Field(True, description="Judge pairwise against the reference (false: skip this part).")
    instructions: Path | None = Field(
        None, description="Instruction set (any format `generate` reads); default: the MT-Bench questions' first turns.")
    reference: TeacherConfig | None = Field(
        None, description="The reference answers: a response set (backend: file) or a model to generate them.")
    limit: int | None = Field(None, ge=1, description="Use only the first N instructions.")
    judged: bool = Field(True, description="false: no judge on the pairs, only the cheap signals on them (reward win "
                         "rate, held-out loss) - what fits a CPU when many students are evaluated.")


class EvaluateConfig(Strict):
    student: TeacherConfig = Field(description="The model under evaluation (any `generate` backend); name defaults to 'student'.")
    judge: TeacherConfig = Field(
        TeacherConfig(name="judge", model="qwen2.5-coder-0.5b-instruct"),
        description="Judge: a local causal LM (backend transformers/vllm, generating its verdict) or an "
        "OpenAI-compatible endpoint (backend openai), the GPT-4-class judges MT-Bench and AlpacaEval use.")
    decoding: DecodingConfig = Field(DecodingConfig(max_new_tokens=512), description="Student (and reference model) answers.")
    judge_decoding: DecodingConfig = Field(DecodingConfig(max_new_tokens=512), description="Judge outputs (greedy).")
    mtbench: MTBenchOptions = MTBenchOptions()
    pairwise: PairwiseOptions = PairwiseOptions()
    reward: RewardConfig | None = Field(
        None, description="Reward-model win rate of the student against the pairwise reference (off when unset).")
    heldout: Path | None = Field(
        None, description="Response set for the student's held-out loss; default: the pairwise reference answers.")
    heldout_loss: bool = Field(True, description="Score the held-out loss (in-process students only).")
    max_length: int = Field(2048, ge=16, description="Tokens per held-out example.")
    max_prompt_tokens: int = Field(4096, ge=8, description="Longer student/judge prompts are counted and not generated.")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for 95% intervals (0 = none).")
    seed: int = Field(0, description="Seed of sampling and of the bootstrap resamples.")
    on_error: Literal["stop", "skip"] = Field("stop", description="Malformed rows: stop (default) or skip and count.")
    models: ModelOptions = ModelOptions()
    out: Path | None = Field(None, description="Run directory (default: runs/evaluate-<config digest>); re-run to resume.")

    @field_validator("student", "judge", mode="before")
    @classmethod
    def _default_names(cls, v: Any, info) -> Any:
        if isinstance(v, str):  # a bare model spec
            v = {"model": v}
        if isinstance(v, dict) and "name" not in v:
            v = {**v, "name": info.field_name}
        return v


class StudyRank(RankConfig):
    """`rank`'s options for a study; the student and the response sets come from the study."""

    student: str | None = Field(None, description="Leave unset: the study's `student`.")


class StudyFinetune(DistillConfig):
    """`distill`'s options for a study's fine-tunes: sequence-level KD (kd.lambda = 0, CE on the teacher's
    responses), the same budget for every teacher. The student and the data come from the study."""

    student: str | None = Field(None, description="Leave unset: the study's `student`.")
    data: TrainData = Field(TrainData(), description="Leave unset: each teacher's responses to the training split.")
    kd: KDConfig = Field(KDConfig(**{"lambda": 0.0}), description="Sequence-level KD only: kd.lambda must be 0.")

    @field_validator("kd", mode="before")
    @classmethod
    def _sequence_level(cls, v: Any) -> Any:
        return {**v, "lambda": 0.0} if isinstance(v, dict) and "lambda" not in v and "lambda_" not in v else v

    @field_validator("kd")
    @classmethod
    def _no_logits(cls, v: KDConfig) -> KDConfig:
        if v.lambda_ != 0:
            raise ValueError("a study fine-tunes on each teacher's responses (sequence-level KD): kd.lambda must be 0")
        return v


class StudyEvaluate(EvaluateConfig):
    """`evaluate`'s options for a study; the student is each fine-tuned model in turn. By default the pairwise
    part uses the study's held-out instructions."""

    student: TeacherConfig | None = Field(None, description="Leave unset: each fine-tuned student.")


class StudyGenerate(GenerateConfig):
    """`generate`'s options for a study (decoding, models); instructions and teachers come from the study."""

    instructions: Path | None = Field(None, description="Leave unset: the study's training split.")
    teachers: list[TeacherConfig] = Field(default_factory=list, description="Leave unset: the study's teachers.")


class TeacherPair(Strict):
    """Two teachers of one family, to check the paradox: did the larger one give the better student?"""

    larger: str = Field(description="Name of the larger teacher setting.")
    smaller: str = Field(description="Name of the smaller teacher setting of the same family.")
    family: str | None = Field(None, description="Family name for the report (e.g. Qwen2.5).")


STUDY_OUTCOMES = ("mtbench", "win_rate", "lc_win_rate", "reward_win_rate", "reward_mean", "heldout_loss")


class StudyConfig(Strict):
    """The CAR paper's experiment for one student and N teachers: responses, every rank metric, a fine-tune per
    teacher (same budget), an evaluation per fine-tuned student, and how well each metric predicted the outcome."""

    instructions: Path = Field(description="Instruction set (any format `generate` reads).")
    heldout: int = Field(4, ge=0, description="Instructions held out of fine-tuning (seeded choice); the students "
                         "are evaluated on them (pairwise and reward win rate, held-out loss) unless evaluate says otherwise.")
    limit: int | None = Field(None, ge=1, description="Use only the first N instructions.")
    student: str | list[str] = Field(description="The untuned student base model (or a list of them): ranked for, then "
                                     "fine-tuned on each teacher; several students are studied one after the other "
                                     "on the same responses and also pooled.")
    teachers: list[TeacherConfig] = Field(min_length=3, description="Teacher settings (a model with its decoding, a "
                                          "server, or an existing response set); two decodings of one model are two settings.")
    seed_repeats: list[str] = Field(default_factory=list, description="Teachers whose fine-tune is run a second time "
                                    "with train.seed + 1: the outcome's spread across seeds, against its spread across "
                                    "teachers, says whether the fine-tunes are long enough to tell teachers apart.")
    mixtures: list[Literal["car", "grape"]] = Field(
        default_factory=list, description="Per-instruction selections fine-tuned beside the single teachers "
        "(data.best_of_rank with each rule: 'car' the best per-sample CAR, 'grape' the response the student finds "
        "most likely): does mixing beat the best single teacher?")
    generate: StudyGenerate = StudyGenerate()
    rank: StudyRank = StudyRank()
    finetune: StudyFinetune = StudyFinetune()
    evaluate: StudyEvaluate = StudyEvaluate()
    outcome: Literal[STUDY_OUTCOMES] = Field(  # type: ignore[valid-type]
        "reward_win_rate", description="The evaluated number each metric is correlated with: 'mtbench' (overall score), "
        "'win_rate' / 'lc_win_rate' (pairwise, judged), 'reward_win_rate', 'reward_mean' (mean reward of the student's "
        "answers), 'heldout_loss' (negated: higher = better). The others are reported too.")
    pairs: list[TeacherPair] = Field(default_factory=list, description="Larger/smaller teachers of one family.")
    baseline: bool = Field(True, description="Also evaluate the untuned student (context only, not correlated).")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for the correlations' 95% intervals.")
    seed: int = Field(0, description="Seed of the held-out split and the bootstrap resamples.")
    out: Path | None = Field(None, description="Run directory (default: runs/study-<config digest>); re-run to resume.")

    @field_validator("teachers")
    @classmethod
    def _unique(cls, v: list[TeacherConfig]) -> list[TeacherConfig]:
        names = [t.name for t in v]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique: {names}")
        return v

    @field_validator("student")
    @classmethod
    def _students(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError("give one student, or a list of different students")
        return v

    @property
    def students(self) -> list[str]:
        return [self.student] if isinstance(self.student, str) else list(self.student)


# The config class of each command: `teacherfit config COMMAND` lists its fields from here, so the listing is the
# validation itself and cannot drift from it.
COMMAND_CONFIGS: dict[str, type[BaseModel]] = {
    "generate": GenerateConfig, "rank": RankConfig, "correlate": CorrelateConfig, "distill": DistillConfig,
    "cache-teacher": CacheTeacherConfig, "align": AlignConfig, "evaluate": EvaluateConfig, "study": StudyConfig,
    "quickstart": QuickstartConfig,
}


def _type_name(ann: Any) -> str:
    """A field's type as a user writes it in YAML: ``float``, ``str | null``, ``'auto' | 'plain'``, ``list[...]``."""
    import types
    import typing

    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple, set):
        return f"list[{', '.join(_type_name(a) for a in args[:1])}]"
    if origin is dict:
        return f"mapping[{', '.join(_type_name(a) for a in args)}]"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "section"
    if ann is Path:
        return "path"
    if ann is Any:
        return "any"
    return getattr(ann, "__name__", str(ann))


def _sections_in(ann: Any) -> tuple[type[BaseModel] | None, bool]:
    """The config section a field holds (``list[TeacherConfig]``: (TeacherConfig, True)), if any."""
    import typing

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann, False
    for arg in typing.get_args(ann):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg, typing.get_origin(ann) in (list, tuple)
        inner, listed = _sections_in(arg)
        if inner is not None:
            return inner, listed or typing.get_origin(arg) in (list, tuple)
    return None, False


def describe_fields(cls: type[BaseModel], prefix: str = "") -> list[dict[str, str]]:
    """Every field of a config class, nested sections flattened to dotted names (``train.lr``; items of a list of
    sections as ``teachers[].name``), with its type, default and description."""
    from pydantic_core import PydanticUndefined

    rows = []
    for name, info in cls.model_fields.items():
        key = prefix + (info.alias or name)
        if info.default is not PydanticUndefined:
            default = info.default
        elif info.default_factory is not None:
            default = info.default_factory()
        else:
            default = PydanticUndefined
        section, listed = _sections_in(info.annotation)
        if default is PydanticUndefined:
            shown = "required"
        elif isinstance(default, BaseModel):
            shown = "(section)"
        elif isinstance(default, Path):
            shown = str(default)
        else:
            shown = json.dumps(default, default=str)
        rows.append({"field": key, "type": _type_name(info.annotation), "default": shown,
                     "description": " ".join((info.description or "").split())})
        if section is not None:
            doc = " ".join((section.__doc__ or "").split()) if section.__doc__ != BaseModel.__doc__ else ""
            if doc and not rows[-1]["description"]:
                rows[-1]["description"] = doc
            rows.extend(describe_fields(section, f"{key}[]." if listed else f"{key}."))
    return rows


C = TypeVar("C", bound=BaseModel)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (value parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: the key {key!r} has an empty part; write key.sub=value")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = yaml.load(raw, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as err:
            reason = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({reason}); quote it, "
                              f"e.g. --set '{key}=\"...\"'") from None
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key]}, again on line {line}); "
                    "keep one", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """A YAML file's content; every way it can fail is one ConfigError naming the file (and line)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; give a YAML file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({reason})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    """The field names (aliases included) of the model that ``loc`` (minus its last part) points into."""
    import typing

    model: Any = cls
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        info = model.model_fields.get(part) or next(
            (f for f in model.model_fields.values() if f.alias == part), None)
        if info is None:
            return []
        ann = info.annotation
        inner = [a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        for arg in typing.get_args(ann):  # list[TeacherConfig] inside Optional
            inner += [a for a in typing.get_args(arg) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else (inner[0] if inner else None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return []
    return [f.alias or name for name, f in model.model_fields.items()]


# TRL / Transformers TrainingArguments names a user brings along, and teacherfit's field for each (dotted, from the
# command's top level). Refused with the name to use rather than accepted as aliases: one spelling per field in
# configs, resolved configs and digests, so two runs that mean the same thing compare equal.
TRL_NAMES: dict[str, str] = {
    "learning_rate": "train.lr",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "num_train_epochs": "train.epochs",
    "output_dir": "out",
    "logging_steps": "train.log_every",
    "save_steps": "train.checkpoint_every",
    "save_total_limit": "train.keep_checkpoints",
    "warmup_steps": "train.warmup_steps",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "max_steps": "train.max_steps",
    "max_seq_length": "train.max_length",
    "max_length": "train.max_length",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "seed": "train.seed",
    "report_to": "train.report_to",
    "model_name_or_path": "student",
    "teacher_model_name_or_path": "teacher",
    "teacher_model": "teacher",
    "bf16": "models.dtype",
    "fp16": "models.dtype",
    "use_peft": "lora",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "temperature": "kd.temperature",
    "beta": "kd.divergence_kwargs.beta",
}
# TRL names whose meaning differs from teacherfit's field of a similar name: said explicitly.
TRL_MEANINGS: dict[str, str] = {
    "lmbda": "TRL's GKD `lmbda` (the share of batches the student generates itself) is `kd.on_policy` here; "
             "`kd.lambda` is something else: the weight of KD against CE",
    "beta": "TRL's GKD `beta` interpolates its generalized JSD: here `kd.divergence: generalized_jsd` with "
            "`kd.divergence_kwargs.beta` (rank's top-level `beta` is CAR's, a different thing)",
}


def _has_path(cls: type[BaseModel], dotted: str) -> bool:
    """Whether ``dotted`` (e.g. ``train.lr``) names a field of ``cls``."""
    parts = dotted.split(".")
    return parts[-1] in _fields_at(cls, tuple(parts)) or (
        len(parts) > 1 and parts[-2] == "divergence_kwargs" and _has_path(cls, ".".join(parts[:-1])))


def _trl_hint(cls: type[BaseModel], loc: tuple) -> str:
    """"that is TRL's name: use `train.lr`" when the unknown key is a TRL/Transformers name this command has."""
    key = str(loc[-1])
    if key in TRL_MEANINGS and (key != "beta" or _has_path(cls, "kd")):
        return f"; {TRL_MEANINGS[key]}"
    target = TRL_NAMES.get(key)
    if target is None or not _has_path(cls, target):
        return ""
    where = ".".join(str(p) for p in loc[:-1] if not isinstance(p, int))
    if where and target.startswith(where + "."):
        target = target[len(where) + 1:]  # written inside `train:`: name the key there
    elif where:
        target = f"{target} (at the top level)"
    return f"; that is the TRL/Transformers name: teacherfit's is `{target}`"


def format_validation_error(err: ValidationError, source: str, cls: type[BaseModel] | None = None) -> str:
    import difflib

    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        shown = e.get("input")
        if isinstance(shown, (str, list)) and any("url" in str(part) for part in e["loc"]):
            # a URL (or a fleet's list of them) may carry a password or a key: never echo it
            shown = redact_url(shown) if isinstance(shown, str) else [
                redact_url(u) if isinstance(u, str) else u for u in shown]
        got = f" (got {shown!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        hint = ""
        if e["type"] == "extra_forbidden" and cls is not None:
            got = ""
            hint = _trl_hint(cls, tuple(e["loc"]))
            if not hint:
                close = difflib.get_close_matches(str(e["loc"][-1]), _fields_at(cls, tuple(e["loc"])), n=1, cutoff=0.6)
                hint = f"; did you mean `{close[0]}`?" if close else ""
        lines.append(f"  field `{field}`: {e['msg']}{got}{hint}")
    if len(lines) == 2:  # one problem: one line
        return f"{lines[0]} {lines[1].strip()}"
    return "\n".join(lines)


def load_config(cls: type[C], path: Path | None = None, overrides: list[str] | None = None, **values: Any) -> C:
    """Read YAML (optional), apply keyword values then dotted overrides, and validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        data = read_yaml(Path(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of field: value")
        base = Path(path).parent
        data = _resolve_relative_paths(data, base)
    data.update({k: v for k, v in values.items() if v is not None})
    data = apply_overrides(data, overrides or [])
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, cls)) from None


_PATH_KEYS = {"instructions", "responses", "path", "generate_run", "rank_run", "outcomes", "out", "best_of_rank",
              "teacher_cache", "questions", "reference_answers", "judge_prompts", "heldout",
              "expert_cache", "reference_cache", "labelled", "domain", "general"}


# Keys whose value may be a dataset (a file, a save_to_disk folder, or a Hub id) rather than only a path.
_DATA_KEYS = {"instructions", "responses", "path", "heldout", "labelled", "domain", "general", "questions"}


def _relative_to(base: Path, value: str, key: str) -> str:
    """A relative path in a config file is relative to that file; a Hub dataset id (``ORG/NAME?split=...``) that
    names no file there stays as written (data keys only: an output folder is always a path)."""
    from teacherfit.data import is_hub_id

    path, query = (value.split("?", 1) + [""])[:2] if "?" in value else (value, "")
    if Path(path).is_absolute() or (key in _DATA_KEYS and not (base / path).exists() and is_hub_id(value)):
        return value
    return str((base / path).resolve()) + (f"?{query}" if query else "")


def _resolve_relative_paths(data: Any, base: Path) -> Any:
    """Paths in a config file are relative to that file, not to the working directory."""
    if isinstance(data, dict):
        return {
            k: (_relative_to(base, v, k) if k in _PATH_KEYS and isinstance(v, str) else _resolve_relative_paths(v, base))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [_resolve_relative_paths(v, base) for v in data]
    return data


def config_digest(cfg: BaseModel) -> str:
    return hashlib.sha256(cfg.model_dump_json(exclude={"out"}).encode()).hexdigest()[:10]


# Run directories this process prepared: path -> (lock fd, created by this process). The lock is an flock on
# `.lock` in the directory, so it is released by the kernel when the process dies (SIGKILL included): a
# killed run never leaves a stale lock behind, and a second process on the same --out is told who holds it.
_RUNS: dict[Path, tuple[int, bool]] = {}
LOCK_NAME = ".lock"
FAILED_NAME = "failed.json"


def _take_lock(out: Path) -> int:
    import fcntl
    import socket
    import time

    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(f"run directory {out} is in use by {holder}; wait for it to finish, stop it, "
                          "or give another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    return fd


def redact_urls(value: Any) -> Any:
    """The resolved config with the secrets of every ``base_url`` masked (it is written to disk)."""
    if isinstance(value, dict):
        return {k: redact_url(v) if k == "base_url" and isinstance(v, str)
                else [redact_url(u) if isinstance(u, str) else u for u in v] if k == "base_url" and isinstance(v, list)
                else redact_urls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_urls(v) for v in value]
    return value


def config_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``field: old -> new`` for every leaf that differs between two resolved configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in list(old) + [k for k in new if k not in old]:
            out += config_changes(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def prepare_run_dir(cfg: BaseModel, command: str, runs_root: Path = Path("runs")) -> Path:
    """The run directory (given, or ``runs/<command>-<config digest>`` so a re-run resumes), locked for this
    process, with the resolved config (secrets in URLs masked).

    Call it once the inputs have been read and checked, right before the first expensive step: a run that
    fails on its input then leaves no directory that looks started (and ``finish_runs`` removes a new one
    that holds nothing else). A changed config on an existing run directory is printed field by field; what
    that means for reuse is each command's decision (``generate`` keys its rows by the settings that made them).
    """
    out = getattr(cfg, "out", None) or runs_root / f"{command}-{config_digest(cfg)}"
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out: {out} is a file; give a directory (a new one, or a run directory to resume)")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"out: cannot create the run directory {out} ({err.strerror})") from None
    if int(os.environ.get("RANK", "0")) != 0:
        # one run, several processes (torchrun / accelerate launch): the main process holds the lock and
        # writes the config; the others write only what the training loop gives each of them
        return out
    if out not in _RUNS:  # this process may run several commands on one directory (the Python API): one lock
        _RUNS[out] = (_take_lock(out), created)
    resolved = redact_urls(json.loads(cfg.model_dump_json(by_alias=True)))
    previous = out / "config.resolved.yaml"
    if previous.exists():
        try:
            changes = config_changes(yaml.safe_load(previous.read_text()), resolved)
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            changes = ["(the previous config.resolved.yaml could not be read)"]
        if changes:
            from teacherfit.ui import console

            console.print(f"[yellow]note:[/] {out.name}: settings changed since the last run in this directory: "
                          + "; ".join(changes[:8]) + (f" (+{len(changes) - 8} more)" if len(changes) > 8 else ""))
    (out / FAILED_NAME).unlink(missing_ok=True)
    atomic_write_text(previous, yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))
    return out


def finish_runs(error: str | None = None) -> None:
    """Release the run directories this process prepared (the CLI calls it when a command ends).

    On an error, a directory this invocation created that holds nothing but its config is removed (it never
    really started); any other gets ``failed.json`` with the error, so it does not look finished.
    """
    import shutil
    import time

    for out, (fd, created) in list(_RUNS.items()):
        if error is not None and out.is_dir():
            contents = {p.name for p in out.iterdir()}
            if created and contents <= {LOCK_NAME, "config.resolved.yaml"}:
                shutil.rmtree(out, ignore_errors=True)
            else:
                atomic_write_text(out / FAILED_NAME, json.dumps(
                    {"error": error, "at": time.strftime("%Y-%m-%d %H:%M:%S")}, ensure_ascii=False) + "\n")
        os.close(fd)
        del _RUNS[out]
