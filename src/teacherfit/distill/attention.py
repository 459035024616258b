"""Attention-map distillation (the paper's L_attn) while the models keep their fused attention kernels.

docs/papers.md section 2.2: ``L_attn`` is the mean over (layer, head, response query i) of
``sum_{j<=i} A_T (log A_T - log A_S)``. Fused kernels (SDPA, FlashAttention) never materialise the
attention probabilities, and asking for them (``output_attentions=True``) forces eager attention in every
layer and keeps all ``[B, H, T, T]`` maps alive for backward. Instead:

1. ``AttentionCapture`` swaps the model's attention function for a thin wrapper (registered once with
   ``transformers.AttentionInterface``) that calls the model's own implementation unchanged and, for the
   mapped layers only, keeps the post-rotary query and key states it was given.
2. ``attention_kd_sums`` recomputes the attention rows from those states for the response query positions
   only, a chunk of query positions at a time, and accumulates ``losses.attention_kl_sums``. Each chunk
   runs inside ``torch.utils.checkpoint``, so no chunk's maps are kept for backward.

Peak extra memory is a few ``[B, H, query_chunk, T]`` fp32 maps plus the captured q/k of the mapped
layers (which the student's graph keeps anyway).

Scope: causal decoder layers, full-sequence forwards (no KV-cache prefix), one sequence per row. Padding
is handled: right padding needs nothing (a real query only sees earlier, real keys under the causal mask);
left padding needs the 2-D ``attention_mask`` passed to ``attention_kd_sums``. Packed rows (several
sequences per row separated by position ids) are not supported: their block-diagonal mask is not rebuilt.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Iterable, Mapping
from functools import partial
from typing import NamedTuple, Self

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, PreTrainedConfig
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from teacherfit.distill.losses import attention_kl_sums

__all__ = [
    "CAPTURE_IMPLEMENTATION",
    "HEAD_MAPS",
    "AttentionCapture",
    "CapturedAttention",
    "attention_kd_sums",
    "attention_rows",
    "parse_layer_map",
    "uniform_layer_map",
]

CAPTURE_IMPLEMENTATION = "teacherfit_capture"
"""Name under which the capturing attention (and its mask) function is registered in transformers."""

HEAD_MAPS = ("auto", "average", "one_to_one")

_FP32_MIN = torch.finfo(torch.float32).min


# ---------------------------------------------------------------- layer maps


def uniform_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Student layer ``i`` -> teacher layer ``round((i + 1) * Lt / Ls) - 1`` (docs/papers.md, 2.2), for every ``i``.

    Rounds half up, in exact integer arithmetic (so ``Ls = 2, Lt = 5`` maps layer 0 to teacher layer 2).
    The last student layer always maps to the last teacher layer; equal depths give the identity. A
    student deeper than twice the teacher would map its first layers to ``-1``: those are clamped to 0.
    """
    for name, value in (("student_layers", student_layers), ("teacher_layers", teacher_layers)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    # round half up of (i + 1) * Lt / Ls  ==  floor(((i + 1) * Lt * 2 + Ls) / (2 * Ls))
    return {
        i: max(((i + 1) * teacher_layers * 2 + student_layers) // (2 * student_layers) - 1, 0)
        for i in range(student_layers)
    }


def parse_layer_map(spec, student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Resolve a layer-map spec into ``{student layer: teacher layer}`` (0-based), validated.

    ``spec`` is one of:

    - ``"uniform"``: every student layer, ``uniform_layer_map``;
    - ``"last:N"``: the last ``N`` student layers only, with their uniform targets;
    - a dict ``{student: teacher}``;
    - a list of ``[student, teacher]`` pairs.

    Layer indices must be integers (or strings of digits, as JSON object keys are) within range; a
    student layer may appear once; teachers may repeat.
    """
    uniform = uniform_layer_map(student_layers, teacher_layers)
    if isinstance(spec, str):
        text = spec.strip()
        if text == "uniform":
            return uniform
        match = re.fullmatch(r"last:\s*(\d+)", text)
        if match:
            n = int(match.group(1))
            if not 1 <= n <= student_layers:
                raise ValueError(
                    f"layer map {spec!r}: N must be between 1 and the student's {student_layers} layers"
                )
            return {i: uniform[i] for i in range(student_layers - n, student_layers)}
        raise ValueError(
            f"unknown layer map {spec!r}: use 'uniform', 'last:N', a dict {{student: teacher}} or a list "
            "of [student, teacher] pairs"
        )
    if isinstance(spec, Mapping):
        pairs = list(spec.items())
    elif isinstance(spec, (list, tuple)):
        pairs = []
        for item in spec:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise ValueError(
                    f"layer map: each list entry must be a [student, teacher] pair, got {item!r}"
                )
            pairs.append(tuple(item))
    else:
        # ValueError, not TypeError: config validators (pydantic) report ValueErrors as validation errors.
        raise ValueError(  # noqa: TRY004
            f"layer map must be 'uniform', 'last:N', a dict or a list of pairs, got {type(spec).__name__}"
        )
    if not pairs:
        raise ValueError("layer map is empty: map at least one student layer (or turn attention KD off)")
    result: dict[int, int] = {}
    for s, t in pairs:
        s = _layer_index(s, student_layers, "student")
        t = _layer_index(t, teacher_layers, "teacher")
        if s in result:
            raise ValueError(f"layer map: student layer {s} is mapped twice")
        result[s] = t
    return dict(sorted(result.items()))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layer_index(value, n_layers: int, side: str, where: str = "layer map") -> int:
    if isinstance(value, str) and re.fullmatch(r"\d+", value.strip()):
        value = int(value)
    if not _is_int(value):
        raise ValueError(f"{where}: {side} layer must be an integer, got {value!r}")
    if not 0 <= value < n_layers:
        raise ValueError(f"{where}: {side} layer {value} is out of range (the {side} has {n_layers} layers)")
    return value


# ---------------------------------------------------------------- capture


class CapturedAttention(NamedTuple):
    """What one layer's attention kernel received: post-rotary (post-q/k-norm) states, before the kernel."""

    query: Tensor  # [B, Hq, T, d]
    key: Tensor  # [B, Hkv, T, d]
    scaling: float
    softcap: float | None = None  # attention-logit soft-capping (e.g. Gemma 2)
    sliding_window: int | None = None  # keys kept: i - window < j <= i (sliding-window layers)


# id(config) -> (active capture, the config's own implementation). An entry exists only while a capture
# of a model owning that config is active; transformers' attention and mask interfaces are process-wide,
# so the wrapper needs this to find which model (and which original kernel) it is running for.
_ACTIVE: dict[int, tuple[AttentionCapture, str | None]] = {}
_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention)
        AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, _capture_mask)
        _registered = True


def _lookup(config) -> tuple[AttentionCapture, str | None]:
    try:
        return _ACTIVE[id(config)]
    except KeyError:
        raise RuntimeError(
            f"attn_implementation {CAPTURE_IMPLEMENTATION!r} is only valid inside an AttentionCapture block "
            "of this model"
        ) from None


def _original_attention(module: nn.Module, implementation: str | None):
    """The function ``module`` would call without the capture, looked up the way its forward does it."""
    source = sys.modules[type(module).__module__]
    interface = getattr(source, "ALL_ATTENTION_FUNCTIONS", ALL_ATTENTION_FUNCTIONS)
    eager = getattr(source, "eager_attention_forward", None)
    if eager is None and implementation in (None, "eager"):
        raise RuntimeError(f"{type(module).__name__}: no eager_attention_forward in {source.__name__}")
    return interface.get_interface(implementation, eager)


def _capture_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask, **kwargs):
    capture, implementation = _lookup(module.config)
    # Not during backward: activation checkpointing re-runs the layers there, and the states the loss
    # already used must not be replaced by (and kept alongside) recomputed copies.
    if capture._captures(module) and not _in_backward():
        scaling = kwargs.get("scaling")
        if scaling is None:  # what eager and SDPA fall back to
            scaling = getattr(module, "scaling", None) or query.shape[-1] ** -0.5
        capture.captured[module.layer_idx] = CapturedAttention(
            query, key, float(scaling), kwargs.get("softcap"), kwargs.get("sliding_window")
        )
    original = _original_attention(module, implementation)
    if implementation is None or "flash" not in implementation:
        return original(module, query, key, value, mask, **kwargs)
    # Flash kernels dispatch on the implementation name read from the module's config: show them theirs.
    config = module.config
    config._attn_implementation_internal = implementation
    try:
        return original(module, query, key, value, mask, **kwargs)
    finally:
        config._attn_implementation_internal = CAPTURE_IMPLEMENTATION


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _capture_mask(*args, config=None, **kwargs):
    # transformers builds masks with the function registered under the model's implementation name:
    # build the one the original kernel expects (None where that kernel has no mask function).
    _, implementation = _lookup(config)
    if implementation not in ALL_MASK_ATTENTION_FUNCTIONS:
        return None
    return ALL_MASK_ATTENTION_FUNCTIONS[implementation](*args, config=config, **kwargs)


def _all_configs(model: nn.Module) -> list:
    """Every config object of the model: its own, nested sub-configs, and those held by submodules."""
    found: dict[int, object] = {}
    held = [m.config for m in model.modules() if isinstance(getattr(m, "config", None), PreTrainedConfig)]
    stack = [model.config, *held]
    while stack:
        config = stack.pop()
        if id(config) in found:
            continue
        found[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, key, None)
            if isinstance(sub, PreTrainedConfig):
                stack.append(sub)
    return list(found.values())


class AttentionCapture:
    """Keep the post-rotary query/key states of chosen decoder layers during a forward, kernels unchanged.

    While active, the model's attention implementation is ``"teacherfit_capture"``: a wrapper that calls the
    model's own implementation (sdpa, eager, flex, flash, ...) with the same arguments, so outputs are
    identical, and, for the text decoder's layers in ``layers`` (``module.layer_idx``), stores
    ``CapturedAttention(query, key, scaling, softcap, sliding_window)`` in ``captured[layer]``. Masks are
    built by the original implementation's mask function. The previous implementation of every config of
    the model is restored on exit, also after an exception.

    The stored tensors are the ones the model computed: a student run with grad enabled keeps them in its
    autograd graph (the attention loss reaches its q/k projections); run the teacher under
    ``torch.inference_mode()`` or ``torch.no_grad()``. A new forward overwrites ``captured``; entries stay
    after exit until ``clear()``. With activation checkpointing use the non-reentrant kind (reentrant
    checkpointing runs the forward without grad, so the captured student states would be detached).
    Several models (a student and a teacher) may be captured at once, each with its own layers.
    """

    def __init__(self, model: nn.Module, layers: Iterable[int]):
        if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
            raise TypeError(
                f"AttentionCapture needs a transformers PreTrainedModel, got {type(model).__name__}"
            )
        self.model = model
        self.text_config = model.config.get_text_config(decoder=True)
        n_layers = self.text_config.num_hidden_layers
        self.layers = frozenset(_layer_index(i, n_layers, "model", "AttentionCapture") for i in layers)
        self.captured: dict[int, CapturedAttention] = {}
        self._saved: list[tuple[object, str | None]] | None = None

    def _captures(self, module: nn.Module) -> bool:
        return module.config is self.text_config and getattr(module, "layer_idx", None) in self.layers

    def clear(self) -> None:
        """Drop the captured states (and with them the graph they hold)."""
        self.captured.clear()

    def __enter__(self) -> Self:
        if self._saved is not None:
            raise RuntimeError("this AttentionCapture is already active")
        configs = _all_configs(self.model)
        if any(id(c) in _ACTIVE for c in configs):
            raise RuntimeError(f"{type(self.model).__name__} is already inside another AttentionCapture")
        _register()
        self._saved = [(c, c._attn_implementation) for c in configs]
        try:
            self.model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
            if self.text_config._attn_implementation != CAPTURE_IMPLEMENTATION:
                raise RuntimeError(
                    f"{type(self.model).__name__} did not switch to the {CAPTURE_IMPLEMENTATION!r} attention "
                    "implementation: the model must dispatch attention through transformers' "
                    "AttentionInterface to be captured"
                )
            for config, original in self._saved:
                if config._attn_implementation == CAPTURE_IMPLEMENTATION:
                    _ACTIVE[id(config)] = (self, original)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._restore()

    def _restore(self) -> None:
        for config, original in self._saved or []:
            _ACTIVE.pop(id(config), None)
            # The internal attribute, not the setter: restores each config exactly, without re-validation
            # or propagation to sub-configs (each of them is restored from its own saved value).
            config._attn_implementation_internal = original
        self._saved = None


# ---------------------------------------------------------------- attention rows and the loss


def attention_rows(
    q: Tensor,
    k: Tensor,
    scaling: float,
    query_index: Tensor,
    *,
    num_key_value_groups: int | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Post-softmax attention rows of the query positions ``query_index`` only, in fp32.

    ``q`` [B, Hq, T, d] and ``k`` [B, Hkv, Tk, d] as captured (keys are positions ``0 .. Tk - 1``; Tk may
    be cut below T when no query needs the later keys). Query head ``h`` attends with key head
    ``h // (Hq / Hkv)`` (grouped-query attention, without repeating the keys in memory).
    ``query_index`` is a 1-D LongTensor of positions shared by all rows of the batch. Returns
    ``[B, Hq, len(query_index), Tk]`` under the causal mask (key ``j <= i``), narrowed to
    ``i - sliding_window < j`` when ``sliding_window`` is set; logits are soft-capped
    (``tanh(s / cap) * cap``) when ``softcap`` is set.

    Padding: with right padding no mask is needed for the real queries (their keys are all earlier, hence
    real); with left padding pass ``key_padding_mask`` [B, Tk] (True = real token). A row with no visible
    key (a padded query) comes out uniform rather than NaN; exclude it with the query mask.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q must be [B, Hq, T, d] and k [B, Hkv, Tk, d], got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    b, hq, _, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    groups = num_key_value_groups if num_key_value_groups is not None else hq // max(hkv, 1)
    if hkv * groups != hq:
        raise ValueError(f"{hq} query heads do not split into {hkv} key/value heads x {groups} groups")
    query_index = query_index.to(device=q.device, dtype=torch.long)
    n = query_index.numel()

    # [B, Hkv, G * n, d] @ [B, Hkv, d, Tk] -> [B, Hq, n, Tk]; head h = kv_head * G + g, as in repeat_kv.
    q_rows = q.index_select(2, query_index).float().reshape(b, hkv, groups * n, d)
    scores = torch.matmul(q_rows, k.float().transpose(-1, -2)).view(b, hq, n, tk) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap

    key_pos = torch.arange(tk, device=q.device)
    allowed = key_pos[None, :] <= query_index[:, None]  # [n, Tk]
    if sliding_window is not None:
        allowed = allowed & (key_pos[None, :] > query_index[:, None] - sliding_window)
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (b, tk):
            raise ValueError(
                f"key_padding_mask must be [B, Tk] = {(b, tk)}, got {tuple(key_padding_mask.shape)}"
            )
        allowed = allowed & key_padding_mask.to(device=q.device, dtype=torch.bool)[:, None, None, :]
    # A finite fill (not -inf) keeps a row with no visible key finite: uniform, not NaN, in both passes.
    return torch.softmax(scores.masked_fill(~allowed, _FP32_MIN), dim=-1)


def _captured_states(capture) -> Mapping[int, CapturedAttention]:
    return capture.captured if isinstance(capture, AttentionCapture) else capture


def _rows(state: CapturedAttention, index: Tensor, kv_len: int, key_mask: Tensor | None) -> Tensor:
    return attention_rows(
        state.query,
        state.key[:, :, :kv_len],
        state.scaling,
        index,
        softcap=state.softcap,
        sliding_window=state.sliding_window,
        key_padding_mask=None if key_mask is None else key_mask[:, :kv_len],
    )


def _chunk_kl(s_q, s_k, teacher, s_meta, index, chunk_mask, key_mask, kv_len, average):
    student = _rows(CapturedAttention(s_q, s_k, *s_meta), index, kv_len, key_mask)
    with torch.no_grad():
        teacher_rows = _rows(teacher, index, kv_len, key_mask)
    if average:
        student = student.mean(1, keepdim=True)
        teacher_rows = teacher_rows.mean(1, keepdim=True)
    total, _ = attention_kl_sums(student, teacher_rows, chunk_mask)
    return total


def attention_kd_sums(
    student_capture,
    teacher_capture,
    layer_map: Mapping[int, int],
    query_mask: Tensor,
    *,
    head_map: str = "auto",
    query_chunk: int = 128,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, int]:
    """Attention KL summed over mapped layers, heads and response queries, and the number of terms.

    ``student_capture`` / ``teacher_capture``: ``AttentionCapture`` objects (or their ``captured``
    dicts) from forwards over the same input ids (same T). ``layer_map`` {student layer: teacher layer}.
    ``query_mask`` [B, T] marks the response query positions (labels != -100). ``attention_mask``
    [B, T] (1 = real token) is needed only for left-padded batches.

    ``head_map``: ``"one_to_one"`` compares head h with head h (counts must match); ``"average"`` averages
    the attention probabilities over the heads on each side and compares the two average maps (one term
    per query); ``"auto"`` is one-to-one when the query-head counts match, else average.

    Only positions where some row of ``query_mask`` is True are computed, ``query_chunk`` at a time, with
    keys cut after the chunk's last query. Each chunk's student rows and KL run inside a non-reentrant
    ``torch.utils.checkpoint``, so no map is kept for backward; the teacher's rows are computed under
    ``no_grad`` inside the chunk and recomputed with it in backward, rather than stored.

    Returns ``(total, count)``: ``total / count`` is the paper's L_attn (mean over layers, heads and
    response tokens), and sums can be added across micro-batches before dividing. ``total`` is an exact 0
    attached to the student's graph when the mask is empty.
    """
    if head_map not in HEAD_MAPS:
        raise ValueError(f"head_map must be one of {HEAD_MAPS}, got {head_map!r}")
    if not _is_int(query_chunk) or query_chunk < 1:
        raise ValueError(f"query_chunk must be an integer >= 1, got {query_chunk!r}")
    if not layer_map:
        raise ValueError("layer_map is empty")
    student, teacher = _captured_states(student_capture), _captured_states(teacher_capture)
    query_mask = query_mask.bool()
    key_mask = None if attention_mask is None else attention_mask.bool()
    positions = query_mask.any(0).nonzero().squeeze(-1)
    last_positions = positions.tolist()  # one host sync, instead of one per chunk
    n_positions, n_queries = len(last_positions), int(query_mask.sum())
    use_checkpoint = torch.is_grad_enabled()

    total: Tensor | None = None
    count = 0
    for s_layer, t_layer in layer_map.items():
        s_state = _layer_state(student, s_layer, "student")
        t_state = _layer_state(teacher, t_layer, "teacher")
        b, s_heads, t_len, _ = s_state.query.shape
        t_heads = t_state.query.shape[1]
        if t_state.query.shape[0] != b or t_state.query.shape[2] != t_len:
            raise ValueError(
                f"student layer {s_layer} saw [B, T] = {(b, t_len)} but teacher layer {t_layer} saw "
                f"{(t_state.query.shape[0], t_state.query.shape[2])}: run both on the same input ids"
            )
        if s_state.key.shape[2] != t_len or t_state.key.shape[2] != t_len:
            raise ValueError(
                "captured keys are longer than the queries: capture full-sequence forwards without a cache"
            )
        if tuple(query_mask.shape) != (b, t_len):
            raise ValueError(f"query_mask must be [B, T] = {(b, t_len)}, got {tuple(query_mask.shape)}")
        if key_mask is not None and tuple(key_mask.shape) != (b, t_len):
            raise ValueError(f"attention_mask must be [B, T] = {(b, t_len)}, got {tuple(key_mask.shape)}")
        if head_map == "one_to_one" and s_heads != t_heads:
            raise ValueError(
                f"head_map='one_to_one' needs equal head counts, but student layer {s_layer} has {s_heads} "
                f"heads and teacher layer {t_layer} has {t_heads}: use head_map='average'"
            )
        average = head_map == "average" or (head_map == "auto" and s_heads != t_heads)
        if use_checkpoint and not s_state.query.requires_grad:
            warnings.warn(
                f"student layer {s_layer}'s captured query does not require grad, so L_attn sends no "
                "gradient to the student (forward run under no_grad, or reentrant activation checkpointing?)",
                stacklevel=2,
            )
        s_meta = tuple(s_state)[2:]

        # With no response position one empty chunk still runs: an exact 0 attached to the graph.
        for start in range(0, max(n_positions, 1), query_chunk):
            index = positions[start : start + query_chunk]
            end = min(start + query_chunk, n_positions)
            kv_len = last_positions[end - 1] + 1 if end > start else 1
            # Only the student's states go through checkpoint's arguments (saved for backward); the rest,
            # teacher states included (inference tensors cannot be saved), is bound in the closure.
            chunk = partial(
                _chunk_kl, teacher=t_state, s_meta=s_meta, index=index, chunk_mask=query_mask[:, index],
                key_mask=key_mask, kv_len=kv_len, average=average,
            )
            if use_checkpoint:
                part = checkpoint(chunk, s_state.query, s_state.key, use_reentrant=False)
            else:
                part = chunk(s_state.query, s_state.key)
            total = part if total is None else total + part
        count += (1 if average else s_heads) * n_queries
    return total, count


def _layer_state(states: Mapping[int, CapturedAttention], layer: int, side: str) -> CapturedAttention:
    try:
        return states[layer]
    except KeyError:
        raise KeyError(
            f"{side} layer {layer} was not captured (captured: {sorted(states)}): pass the layer map's "
            f"{side} layers to AttentionCapture and run the forward inside it"
        ) from None
