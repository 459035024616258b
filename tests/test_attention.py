"""distill.attention: layer maps, capture vs eager attention maps, and the chunked attention-KD sums."""

import copy

import pytest
import torch
from tiny import tiny_llama
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from teacherfit.distill.attention import (
    CAPTURE_IMPLEMENTATION,
    AttentionCapture,
    attention_kd_sums,
    attention_rows,
    parse_layer_map,
    uniform_layer_map,
)
from teacherfit.distill.losses import attention_kl

# ---------------------------------------------------------------- tiny models and batches


def tiny_gemma3(tokenizer, seed=2):
    """Gemma 3 text model with a sliding-window layer (window 4) and a full-attention layer."""
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_gemma2(tokenizer, seed=3):
    """Gemma 2 (eager only) with a small attention-logit soft cap, so that capping changes the maps."""
    torch.manual_seed(seed)
    cfg = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        attn_logit_softcapping=0.5,
        sliding_window=4,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    # eager, as teacherfit loads it (models.load_model): before transformers 5.21 the default was sdpa, which
    # drops the soft cap
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def tiny_teacher(tokenizer, seed=5):
    """A deeper, narrower-headed Llama: 4 layers, 2 heads of dim 16, 1 kv head."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def right_padded_batch(tokenizer, t=12, real=(12, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tokenizer), (len(real), t), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(real):
        mask[row, :n] = 1
        ids[row, n:] = tokenizer.pad_token_id
    return ids, mask


def response_mask(attention_mask, starts):
    """Response queries: from each row's start to its last real token."""
    mask = attention_mask.bool().clone()
    for row, start in enumerate(starts):
        mask[row, :start] = False
    return mask


def eager_attentions(model, ids, mask):
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        return eager(ids, attention_mask=mask, output_attentions=True).attentions


MODELS = {
    "llama": lambda tok, request: request.getfixturevalue("llama"),
    "qwen2": lambda tok, request: request.getfixturevalue("qwen2"),
    "gemma3": lambda tok, request: tiny_gemma3(tok),
    "gemma2": lambda tok, request: tiny_gemma2(tok),
}


# ---------------------------------------------------------------- layer maps


def test_uniform_layer_map_hand_cases():
    assert uniform_layer_map(2, 4) == {0: 1, 1: 3}
    assert uniform_layer_map(3, 3) == {0: 0, 1: 1, 2: 2}
    # Ls=3, Lt=5: round(5/3)-1 = 1, round(10/3)-1 = 2, round(5)-1 = 4
    assert uniform_layer_map(3, 5) == {0: 1, 1: 2, 2: 4}
    # a tie rounds half up: round(2.5) - 1 = 2
    assert uniform_layer_map(2, 5) == {0: 2, 1: 4}
    assert uniform_layer_map(32, 32) == {i: i for i in range(32)}
    # a student deeper than twice the teacher: first layers clamp to teacher layer 0
    assert uniform_layer_map(4, 1) == {0: 0, 1: 0, 2: 0, 3: 0}


def test_parse_layer_map_specs():
    assert parse_layer_map("uniform", 2, 4) == {0: 1, 1: 3}
    assert parse_layer_map("last:1", 2, 4) == {1: 3}
    assert parse_layer_map("last:2", 3, 5) == {1: 2, 2: 4}
    assert parse_layer_map({1: 0, 0: 3}, 2, 4) == {0: 3, 1: 0}
    assert parse_layer_map([[0, 1], [1, 1]], 2, 4) == {0: 1, 1: 1}
    assert parse_layer_map({"1": "2"}, 2, 4) == {1: 2}  # JSON object keys are strings


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nonsense", "unknown layer map"),
        ("last:0", "between 1 and"),
        ("last:3", "between 1 and"),
        ({2: 0}, "student layer 2 is out of range"),
        ({0: 4}, "teacher layer 4 is out of range"),
        ({0: -1}, "out of range"),
        ({0: 1.0}, "must be an integer"),
        ({True: 1}, "must be an integer"),
        ([[0, 1], [0, 2]], "mapped twice"),
        ([[0, 1, 2]], "pair"),
        ({}, "empty"),
        (3, "must be 'uniform'"),
    ],
)
def test_parse_layer_map_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_layer_map(spec, 2, 4)


# ---------------------------------------------------------------- capture vs eager


@pytest.mark.parametrize("arch", list(MODELS))
def test_captured_maps_match_eager_attentions(arch, tokenizer, request):
    model = MODELS[arch](tokenizer, request)
    implementation = model.config._attn_implementation
    ids, mask = right_padded_batch(tokenizer)
    with AttentionCapture(model, [0, 1]) as capture, torch.no_grad():
        model(ids, attention_mask=mask)
        assert model.config._attn_implementation == CAPTURE_IMPLEMENTATION
    assert model.config._attn_implementation == implementation
    reference = eager_attentions(model, ids, mask)
    t = ids.shape[1]
    for layer in (0, 1):
        state = capture.captured[layer]
        rows = attention_rows(
            state.query, state.key, state.scaling, torch.arange(t),
            softcap=state.softcap, sliding_window=state.sliding_window,
        )
        assert rows.shape == reference[layer].shape
        for row, n_real in enumerate(mask.sum(1).tolist()):  # real queries, all keys
            want = reference[layer][row, :, :n_real]
            torch.testing.assert_close(rows[row, :, :n_real], want, atol=1e-5, rtol=0)
    if arch == "gemma3":
        assert capture.captured[0].sliding_window == 4 and capture.captured[1].sliding_window is None
    if arch == "gemma2":
        assert implementation == "eager" and capture.captured[0].softcap == 0.5


def test_left_padding_needs_the_key_padding_mask(tokenizer, llama):
    ids, mask = right_padded_batch(tokenizer)
    ids, mask = torch.stack([ids[0], ids[1].roll(4)]), torch.stack([mask[0], mask[1].roll(4)])
    with AttentionCapture(llama, [1]) as capture, torch.no_grad():
        llama(ids, attention_mask=mask)
    reference = eager_attentions(llama, ids, mask)[1]
    state = capture.captured[1]
    rows = attention_rows(state.query, state.key, state.scaling, torch.arange(12), key_padding_mask=mask)
    torch.testing.assert_close(rows[0], reference[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(rows[1, :, 4:], reference[1, :, 4:], atol=1e-5, rtol=0)
    assert torch.isfinite(rows).all()  # padded queries see no key: uniform rows, not NaN


def test_attention_rows_subset_of_queries_and_gqa_head_order():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 7, 3), torch.randn(2, 2, 7, 3)
    full = attention_rows(q, k, 0.5, torch.arange(7))
    index = torch.tensor([2, 6])
    torch.testing.assert_close(attention_rows(q, k, 0.5, index), full[:, :, index])
    # naive reference: heads 0, 1 use kv head 0 and heads 2, 3 use kv head 1 (repeat_kv order)
    k_rep = k.repeat_interleave(2, dim=1)
    scores = (q @ k_rep.transpose(-1, -2)) * 0.5
    scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(full, scores.softmax(-1))
    assert (full.triu(1) == 0).all()


def test_capture_leaves_outputs_unchanged_and_restores(tokenizer, llama):
    ids, mask = right_padded_batch(tokenizer)
    with torch.no_grad():
        plain = llama(ids, attention_mask=mask).logits
        with AttentionCapture(llama, [0]) as capture:
            captured = llama(ids, attention_mask=mask).logits
    assert torch.equal(plain, captured)
    assert list(capture.captured) == [0]
    assert llama.config._attn_implementation == "sdpa"

    with pytest.raises(RuntimeError, match="boom"), AttentionCapture(llama, [1]):
        raise RuntimeError("boom")
    assert llama.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(llama(ids, attention_mask=mask).logits, plain)
    capture.clear()
    assert capture.captured == {}


def test_capture_rejects_nesting_and_bad_layers(tokenizer, llama):
    with pytest.raises(ValueError, match="AttentionCapture: model layer 2 is out of range"):
        AttentionCapture(llama, [2])
    with AttentionCapture(llama, [0]):
        with pytest.raises(RuntimeError, match="already inside"), AttentionCapture(llama, [1]):
            pass
        assert llama.config._attn_implementation == CAPTURE_IMPLEMENTATION
    assert llama.config._attn_implementation == "sdpa"


def test_flash_style_kernels_see_their_own_implementation_name(tokenizer):
    """Flash kernels read module.config._attn_implementation: the wrapper shows them the original name."""
    name = "teacherfit_test_flash"
    seen = []

    def fake_flash(module, *args, **kwargs):
        seen.append(module.config._attn_implementation)
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register(name, fake_flash)
    model = tiny_teacher(tokenizer)
    model.config._attn_implementation_internal = name  # bypasses the flash-attn install checks
    ids = torch.randint(3, len(tokenizer), (1, 6))
    with torch.no_grad():
        plain = model(ids).logits
        with AttentionCapture(model, [0]) as capture:
            captured = model(ids).logits
    assert set(seen) == {name} and len(seen) == 8
    assert torch.equal(plain, captured) and list(capture.captured) == [0]
    assert model.config._attn_implementation == name


# ---------------------------------------------------------------- attention_kd_sums


def run_pair(student, teacher, s_layers, t_layers, ids, mask):
    with AttentionCapture(student, s_layers) as s_cap, AttentionCapture(teacher, t_layers) as t_cap:
        student(ids, attention_mask=mask)
        with torch.inference_mode():
            teacher(ids, attention_mask=mask)
    return s_cap, t_cap


def reference_attention_loss(student, teacher, layer_map, ids, mask, query_mask, average):
    """Eager output_attentions of both models, losses.attention_kl per layer, mean over layers."""
    student_eager = copy.deepcopy(student)
    student_eager.set_attn_implementation("eager")
    s_maps = student_eager(ids, attention_mask=mask, output_attentions=True).attentions
    t_maps = eager_attentions(teacher, ids, mask)
    per_layer = []
    for s, t in layer_map.items():
        a_s, a_t = s_maps[s], t_maps[t]
        if average:
            a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
        per_layer.append(attention_kl(a_s, a_t, query_mask))
    return torch.stack(per_layer).mean(), student_eager


def test_kd_sums_match_eager_reference_with_head_averaging(tokenizer):
    student = tiny_llama(tokenizer, seed=11).train()  # 2 layers, 4 heads, 2 kv heads, head dim 8
    teacher = tiny_teacher(tokenizer)  # 4 layers, 2 heads, 1 kv head, head dim 16
    layer_map = parse_layer_map("uniform", 2, 4)
    ids, mask = right_padded_batch(tokenizer)
    query_mask = response_mask(mask, starts=(5, 3))
    s_cap, t_cap = run_pair(student, teacher, layer_map.keys(), layer_map.values(), ids, mask)

    total, count = attention_kd_sums(s_cap, t_cap, layer_map, query_mask, query_chunk=3)
    assert count == 2 * 1 * int(query_mask.sum())  # layers x (averaged) heads x response queries
    reference, student_eager = reference_attention_loss(
        student, teacher, layer_map, ids, mask, query_mask, average=True
    )
    assert reference > 0
    torch.testing.assert_close(total / count, reference, atol=1e-6, rtol=1e-5)

    # The same gradients reach the student as through the eager reference; none reach the teacher.
    (total / count).backward()
    reference.backward()
    for layer in layer_map:
        got = student.model.layers[layer].self_attn.q_proj.weight.grad
        want = student_eager.model.layers[layer].self_attn.q_proj.weight.grad
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(
            student.model.layers[layer].self_attn.k_proj.weight.grad,
            student_eager.model.layers[layer].self_attn.k_proj.weight.grad, atol=1e-6, rtol=1e-4,
        )
    assert all(p.grad is None for p in teacher.parameters())


def test_kd_sums_one_to_one_chunk_invariance_and_identity(tokenizer, llama, qwen2):
    layer_map = {0: 1, 1: 0}
    ids, mask = right_padded_batch(tokenizer, seed=1)
    query_mask = response_mask(mask, starts=(6, 2))
    with torch.no_grad():
        s_cap, t_cap = run_pair(llama, qwen2, [0, 1], [0, 1], ids, mask)
        values = {
            chunk: attention_kd_sums(s_cap, t_cap, layer_map, query_mask, query_chunk=chunk)
            for chunk in (1, 3, 64)
        }
        reference, _ = reference_attention_loss(llama, qwen2, layer_map, ids, mask, query_mask, average=False)
    for total, count in values.values():
        assert count == 2 * 4 * int(query_mask.sum())
        torch.testing.assert_close(total, values[64][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(values[1][0] / values[1][1], reference, atol=1e-6, rtol=1e-5)
    # forced averaging differs from one-to-one; identical models give 0
    with torch.no_grad():
        averaged, n_avg = attention_kd_sums(s_cap, t_cap, layer_map, query_mask, head_map="average")
        same, _ = attention_kd_sums(s_cap, s_cap, {0: 0, 1: 1}, query_mask, query_chunk=5)
    assert n_avg == 2 * int(query_mask.sum()) and not torch.isclose(averaged / n_avg, reference)
    assert abs(same.item()) < 1e-6


def test_kd_sums_with_activation_checkpointing_inside_the_capture(tokenizer):
    """Non-reentrant layer checkpointing: same gradients; the recompute in backward does not re-capture."""
    teacher = tiny_teacher(tokenizer)
    ids, mask = right_padded_batch(tokenizer)
    query_mask = response_mask(mask, starts=(5, 3))
    grads = []
    for checkpointed in (False, True):
        student = tiny_llama(tokenizer, seed=11).train()
        if checkpointed:  # the non-reentrant checkpointing both names give (the newer one from transformers 5.23)
            if hasattr(student, "activation_checkpointing_enable"):
                student.activation_checkpointing_enable()
            else:
                student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with AttentionCapture(student, [0, 1]) as s_cap, AttentionCapture(teacher, [1, 3]) as t_cap:
            logits = student(ids, attention_mask=mask, use_cache=False).logits
            with torch.inference_mode():
                teacher(ids, attention_mask=mask)
            used = {layer: state.query for layer, state in s_cap.captured.items()}
            total, count = attention_kd_sums(s_cap, t_cap, {0: 1, 1: 3}, query_mask, query_chunk=4)
            (total / count + logits.float().logsumexp(-1).mean()).backward()
            assert all(s_cap.captured[layer].query is q for layer, q in used.items())
        grads.append(student.model.layers[0].self_attn.q_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_kd_sums_warn_when_the_student_is_detached(tokenizer, llama):
    ids, mask = right_padded_batch(tokenizer)
    with torch.no_grad():
        s_cap, t_cap = run_pair(llama, tiny_teacher(tokenizer), [0], [1], ids, mask)
    with pytest.warns(UserWarning, match="no gradient"):
        attention_kd_sums(s_cap, t_cap, {0: 1}, mask.bool())


def test_kd_sums_empty_mask_is_an_attached_zero(tokenizer):
    student, teacher = tiny_llama(tokenizer, seed=3), tiny_teacher(tokenizer)
    ids, mask = right_padded_batch(tokenizer)
    s_cap, t_cap = run_pair(student, teacher, [1], [3], ids, mask)
    total, count = attention_kd_sums(s_cap, t_cap, {1: 3}, torch.zeros_like(mask, dtype=torch.bool))
    assert count == 0 and total.item() == 0.0 and total.requires_grad
    total.backward()
    assert student.model.layers[1].self_attn.q_proj.weight.grad.abs().sum() == 0


def test_kd_sums_errors(tokenizer, llama):
    ids, mask = right_padded_batch(tokenizer)
    teacher = tiny_teacher(tokenizer)
    with torch.no_grad():
        s_cap, t_cap = run_pair(llama, teacher, [0], [1], ids, mask)
    query_mask = mask.bool()
    with pytest.raises(ValueError, match="one_to_one"):
        attention_kd_sums(s_cap, t_cap, {0: 1}, query_mask, head_map="one_to_one")
    with pytest.raises(ValueError, match="head_map"):
        attention_kd_sums(s_cap, t_cap, {0: 1}, query_mask, head_map="first")
    with pytest.raises(KeyError, match="student layer 1 was not captured"):
        attention_kd_sums(s_cap, t_cap, {1: 1}, query_mask)
    with pytest.raises(ValueError, match="query_chunk"):
        attention_kd_sums(s_cap, t_cap, {0: 1}, query_mask, query_chunk=0)
    with pytest.raises(ValueError, match="query_mask"):
        attention_kd_sums(s_cap, t_cap, {0: 1}, query_mask[:, :5])


def test_kd_sums_keep_no_map_for_backward(tokenizer):
    """No tensor saved for backward outside the per-chunk checkpoints has B*H*T*T elements (T=64)."""
    student, teacher = tiny_llama(tokenizer, seed=4).train(), tiny_teacher(tokenizer)
    b, h, t = 2, 4, 64
    ids = torch.randint(3, len(tokenizer), (b, t), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    query_mask = response_mask(mask, starts=(8, 8))
    s_cap, t_cap = run_pair(student, teacher, [0, 1], [1, 3], ids, mask)

    sizes = []

    def pack(x):
        sizes.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        total, count = attention_kd_sums(s_cap, t_cap, {0: 1, 1: 3}, query_mask, query_chunk=8)
    assert sizes and max(sizes) < b * h * t * t  # only the captured q/k, saved by reference
    # the hook does see maps when they are built outside a checkpoint
    control = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: control.append(x.numel()) or x, lambda x: x):
        state = s_cap.captured[0]
        attention_rows(state.query, state.key, state.scaling, torch.arange(t)).log().sum()
    assert max(control) >= b * h * t * t
    (total / count).backward()
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_softcapped_attention_loads_eager_with_the_cap_applied(tokenizer, tmp_path):
    """load_model gives Gemma 2 eager attention (the only kernel that applies attn_logit_softcapping): its logits are
    those of the eager model, not those of an sdpa one, which drops the cap (transformers' default before 5.21)."""
    from teacherfit.models import load_model
    from tiny import save_tiny

    model = tiny_gemma2(tokenizer)
    with torch.no_grad():  # attention logits well past the cap (0.5), as a trained model's are past Gemma 2's 50
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(40.0)
    folder = save_tiny(model, tokenizer, tmp_path / "gemma2")
    loaded = load_model(str(folder), device="cpu", dtype="float32")
    assert loaded.model.config._attn_implementation == "eager"
    ids = torch.tensor([tokenizer("Write a short poem about the sea.")["input_ids"]])
    with torch.no_grad():
        got = loaded.model(ids).logits
        want = model(ids).logits
        for layer in model.model.layers:  # what a kernel that drops the cap computes
            layer.self_attn.attn_logit_softcapping = None
        uncapped = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (uncapped - want).abs().max() > 1e-3  # the cap matters in this model: dropping it shows
