"""Numbers that must be the model's own: post-head logit transforms, the cache's vocabulary, the LoRA reference.

Every reference here comes from ``model(ids).logits``, the architecture's own forward, so a transform that
teacherfit's chunked head path leaves out (Granite's logits_scaling, Cohere's logit_scale, soft-capping, ...)
shows up as a wrong NLL, KD value, cached log-prob or starting-weights teacher.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from teacherfit.config import CacheTeacherConfig, KDConfig, ModelOptions, ResponseSetConfig, TrainData
from teacherfit.data import Record, tokenize_example
from teacherfit.distill.cache import CacheMismatchError, TopKCache
from teacherfit.distill.examples import TrainExample, example_key
from teacherfit.distill.examples import collate
from teacherfit.distill.teachers import OnlineTeacher, StartingWeightsTeacher
from teacherfit.distill.train import DistillModule
from teacherfit.models import load_tokenizer
from teacherfit.pipelines.cache_teacher import run_cache_teacher, teacher_topk
from teacherfit.scoring import PostHead, UnsupportedHead, head_transform, lm_head_logits, post_head_of, score_examples
from tiny import save_tiny, tiny_llama

# Every family of the installed transformers whose causal LM transforms the logits after its head (or the
# hidden states right before it), with a tiny config and a transform large enough to change every NLL.
FAMILIES = {
    "granite": dict(logits_scaling=8.0),
    "granitemoe": dict(logits_scaling=8.0, num_local_experts=4, num_experts_per_tok=2),
    "granitemoeshared": dict(logits_scaling=8.0, num_local_experts=4, num_experts_per_tok=2,
                             shared_intermediate_size=32),
    "granite_swa": dict(logits_scaling=8.0),
    "granitemoe_swa": dict(logits_scaling=8.0, num_local_experts=4, num_experts_per_tok=2),
    "granitemoehybrid": dict(logits_scaling=8.0, layer_types=["mamba", "attention"], num_local_experts=4,
                             num_experts_per_tok=2, shared_intermediate_size=32, mamba_n_heads=4, mamba_d_head=16,
                             mamba_expand=2, mamba_n_groups=1, mamba_d_state=16, mamba_chunk_size=16),
    "hyperclovax": dict(logits_scaling=4.0),  # multiplies
    "cohere": dict(logit_scale=0.25),
    "cohere2": dict(logit_scale=0.25),
    "cohere2_moe": dict(logit_scale=0.25),
    "falcon_h1": dict(lm_head_multiplier=3.0, mamba_n_heads=4, mamba_d_head=16, mamba_d_ssm=64, mamba_d_state=16,
                      mamba_chunk_size=16),  # small mamba sizes: the defaults need 24 GB on transformers < 5.23
    "minicpm3": dict(dim_model_base=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                     v_head_dim=8, num_key_value_heads=4),  # hidden / (hidden_size / dim_model_base) = hidden / 8
    "inkling_text": dict(logits_mup_width_multiplier=6.0),  # hidden / 6
    "gemma2": dict(final_logit_softcapping=0.5, head_dim=8),
    "gemma3_text": dict(final_logit_softcapping=0.5, head_dim=8),
    "vaultgemma": dict(final_logit_softcapping=0.5, head_dim=8),
    "nanochat": dict(final_logit_softcapping=0.5),
    "beam": dict(final_logit_softcapping=0.5),
    "inkling2_text": dict(final_logit_softcapping=0.5),
    "recurrent_gemma": dict(logits_soft_cap=0.5),
    "xlstm": dict(output_logit_soft_cap=0.5),
}

CHATS = [
    [{"role": "user", "content": "Write a short poem about the sea."},
     {"role": "assistant", "content": "The sea is blue and wide."}],
    [{"role": "user", "content": "List three colours."}, {"role": "assistant", "content": "red, green and blue"}],
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris is the capital of France."}],
]


def tiny_family(model_type, tokenizer, seed=0, **extra):
    values = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    values.update(FAMILIES.get(model_type, {}), **extra)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **values)).eval()


def own_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()


# ---------------------------------------------------------------- post-head transforms


def known(model_type: str):
    """A parameter skipped (with the reason) on a transformers that does not have this model type yet."""
    from transformers import __version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return pytest.param(model_type, marks=pytest.mark.skipif(
        model_type not in CONFIG_MAPPING, reason=f"transformers {__version__} has no {model_type!r} models"))


@pytest.mark.parametrize("model_type", [known(t) for t in sorted(FAMILIES)])
def test_head_path_and_scores_match_the_models_own_logits(model_type, tokenizer):
    model = tiny_family(model_type, tokenizer)
    assert not post_head_of(model).identity
    examples = [tokenize_example(tokenizer, chat) for chat in CHATS]
    ids = examples[0].input_ids
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state
        ours = lm_head_logits(model, hidden)[0].double()
    torch.testing.assert_close(ours, own_logits(model, ids), rtol=1e-5, atol=1e-5)

    scored = score_examples(model, examples, pad_token_id=tokenizer.pad_token_id, head_chunk=5)
    for ex, got in zip(examples, scored):
        logits = own_logits(model, ex.input_ids)[:-1]
        targets = torch.tensor(ex.labels[1:])
        want = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
        assert got.n_tokens == int((targets != -100).sum())
        assert got.nll_sum == pytest.approx(want, rel=1e-5)


def test_granite_nll_is_the_models_own(tokenizer):
    """The issue's case: a Granite with logits_scaling=8 scored as if it had none is far off."""
    model = tiny_family("granite", tokenizer, seed=3)
    with torch.no_grad():
        model.model.norm.weight.mul_(30.0)  # peaked logits, like a trained model's
    ex = tokenize_example(tokenizer, CHATS[0])
    (got,) = score_examples(model, [ex], pad_token_id=tokenizer.pad_token_id)
    logits = own_logits(model, ex.input_ids)[:-1]
    want = F.cross_entropy(logits, torch.tensor(ex.labels[1:]), ignore_index=-100)
    unscaled = F.cross_entropy(logits * 8, torch.tensor(ex.labels[1:]), ignore_index=-100)
    assert got.loss == pytest.approx(want.item(), rel=1e-5)
    assert abs(unscaled.item() - want.item()) > 0.5


MULTIMODAL = {  # model type: (text config values, the post-head transform they mean)
    "granite_docling": ({"logits_scaling": 4.0}, PostHead(scale=0.25)),
    "hyperclovax_vision_v2": ({"logits_scaling": 2.0}, PostHead(scale=2.0)),
    "muse_spark": ({"output_multiplier": 3.0, "final_logit_softcapping": 20.0}, PostHead(scale=3.0, softcap=20.0)),
}


@pytest.mark.parametrize("model_type", [known(t) for t in MULTIMODAL])
def test_multimodal_configs_read_their_text_config(model_type):
    """Wrappers whose forward rescales with the text config's value (no tiny model: they need vision towers)."""
    values, expected = MULTIMODAL[model_type]
    config = AutoConfig.for_model(model_type)
    for name, value in values.items():
        setattr(config.text_config, name, value)
    assert post_head_of(config) == expected
    # a Cohere text config inside a wrapper that does not scale (Cohere2 Vision): no transform
    vision = AutoConfig.for_model("cohere2_vision")
    vision.text_config.logit_scale = 0.25
    assert post_head_of(vision).identity


def test_post_head_values_by_hand():
    z = torch.tensor([[-3.0, 0.0, 2.0]])
    torch.testing.assert_close(PostHead(scale=0.5)(z), torch.tensor([[-1.5, 0.0, 1.0]]))
    capped = PostHead(scale=2.0, softcap=1.0)(z)
    torch.testing.assert_close(capped, torch.tanh(torch.tensor([[-6.0, 0.0, 4.0]])))
    assert PostHead().identity and not PostHead(softcap=30.0).identity


def test_an_unknown_post_head_transform_is_refused(tokenizer):
    """A family that changes its logits after the head in a way not listed is refused, not scored wrong."""
    model = tiny_family("llama", tokenizer)

    class Shifted(type(model)):  # a made-up architecture: logits * 3 after the head
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3
            return out

    model.__class__ = Shifted
    ex = tokenize_example(tokenizer, CHATS[0])
    with pytest.raises(UnsupportedHead, match="changes the logits after the LM head"):
        score_examples(model, [ex], pad_token_id=tokenizer.pad_token_id)
    assert head_transform(tiny_family("llama", tokenizer)).identity


def naive_kd_sums(student, teacher, micro, tau):
    """Sum over loss positions of tau^2 KL(p_T || p_S) and of -log p_S(y), from both models' own logits."""
    kd = ce = 0.0
    for b in range(micro.input_ids.shape[0]):
        n = int(micro.attention_mask[b].sum())
        ids = micro.input_ids[b, :n].tolist()
        s, t = own_logits(student, ids), own_logits(teacher, ids)
        for pos in range(n - 1):
            y = int(micro.labels[b, pos + 1])
            if y == -100:
                continue
            ls, lt = F.log_softmax(s[pos] / tau, -1), F.log_softmax(t[pos] / tau, -1)
            kd += tau**2 * float((lt.exp() * (lt - ls)).sum())
            ce -= float(F.log_softmax(s[pos], -1)[y])
    return kd, ce


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("pair", [("granite", "cohere"), ("llama", "gemma2"), ("hyperclovax", "llama")])
def test_online_kd_uses_both_models_own_logits(pair, fused, tokenizer):
    student = tiny_family(pair[0], tokenizer, seed=1).train()
    teacher = tiny_family(pair[1], tokenizer, seed=2)
    examples = [TrainExample(str(i), tokenize_example(tokenizer, c)) for i, c in enumerate(CHATS)]
    micro = collate(examples, tokenizer.pad_token_id)
    kd_cfg = KDConfig.model_validate({"lambda": 0.5, "temperature": 1.5, "fused_head": fused})
    module = DistillModule(student, kd_cfg, vocab=None, layer_map=None, capture=None)
    signal = OnlineTeacher(teacher, vocab=None, attn_layers=None, device=torch.device("cpu"),
                           student_device=torch.device("cpu"))(micro)
    sums = module(micro.input_ids, micro.attention_mask, micro.labels, signal)
    student.eval()  # no dropout in these tiny configs; eval only for the reference's forward
    kd, ce = naive_kd_sums(student, teacher, micro, 1.5)
    # fp32 KL of two near-uniform tiny models: ~1e-5 of cancellation over the vocabulary sums
    assert sums["kd_sum"].item() == pytest.approx(kd, rel=1e-4, abs=2e-5)
    assert sums["ce_sum"].item() == pytest.approx(ce, rel=1e-5)


# ---------------------------------------------------------------- the teacher cache


def test_cached_logprobs_are_the_teachers_own(tokenizer):
    teacher = tiny_family("granite", tokenizer, seed=4)
    examples = [TrainExample(str(i), tokenize_example(tokenizer, c)) for i, c in enumerate(CHATS)]
    (rows, _), = list(teacher_topk(teacher, examples, top_k=6, pad_token_id=tokenizer.pad_token_id, max_tokens=4096))
    for ex, ids, lps in rows:
        keep = torch.tensor(ex.tokens.labels[1:]) != -100
        logp = F.log_softmax(own_logits(teacher, ex.tokens.input_ids)[:-1][keep], -1).float()
        torch.testing.assert_close(lps, logp.topk(6, -1).values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logp.gather(-1, ids), lps, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def padded(tmp_path_factory, tokenizer):
    """A teacher whose head has 16 rows more than its tokenizer, the padded rows carrying most of the mass."""
    root = tmp_path_factory.mktemp("padded")
    torch.manual_seed(5)
    model = tiny_family("llama", tokenizer, vocab_size=len(tokenizer) + 16)
    with torch.no_grad():
        model.lm_head.weight[len(tokenizer):] *= 50.0
    teacher = save_tiny(model, tokenizer, root / "teacher")
    student = save_tiny(tiny_llama(tokenizer, seed=6), tokenizer, root / "student")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    return root, teacher, student, data


def test_cache_leaves_out_padded_head_rows(padded):
    root, teacher, student, data = padded
    tok = load_tokenizer(str(teacher))
    n = len(tok)
    cfg = CacheTeacherConfig(teacher=str(teacher), data=TrainData(responses=[ResponseSetConfig(name="t", path=data)]),
                             max_length=64, max_tokens=256, top_k=n, models=ModelOptions(device="cpu"),
                             out=root / "cache")
    summary = run_cache_teacher(cfg)
    assert summary["vocab_rows"] == n and summary["tail_samples"] == 0  # K covers the tokenizer: no draws
    cache = TopKCache(root / "cache")
    assert cache.vocab_rows == n
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    for chat in CHATS:
        ex = tokenize_example(tok, chat, max_length=64)
        keep = torch.tensor(ex.labels[1:]) != -100
        want = F.log_softmax(own_logits(model, ex.input_ids)[:-1][keep][:, :n], -1).float()
        ids, lps = cache.get(example_key(Record.from_messages(chat)))
        assert int(ids.max()) < n
        torch.testing.assert_close(want.gather(-1, ids), lps, rtol=2**-10, atol=1e-5)

    # the cache serves a student of the tokenizer's size; a smaller head, or an old cache, is refused
    cache.check_compatible(tok, 64, student_rows=n)
    with pytest.raises(CacheMismatchError, match="fewer than"):
        cache.check_compatible(tok, 64, student_rows=n - 1)
    index = json.loads((root / "cache" / "index.json").read_text())
    del index["meta"]["vocab_rows"]
    (root / "cache" / "index.json").write_text(json.dumps(index))
    with pytest.raises(CacheMismatchError, match="rebuild it"):
        TopKCache(root / "cache").check_compatible(tok, 64)


def test_distill_from_a_padded_teachers_cache(padded, tmp_path):
    """The issue's crash: tail ids from padded rows indexed past the student's head."""
    from teacherfit.config import DistillConfig, load_config
    from teacherfit.pipelines.distill import run_distill

    root, teacher, student, data = padded
    cache_dir = tmp_path / "cache"
    run_cache_teacher(CacheTeacherConfig(
        teacher=str(teacher), data=TrainData(responses=[ResponseSetConfig(name="t", path=data)]), max_length=64,
        max_tokens=256, top_k=8, models=ModelOptions(device="cpu"), out=cache_dir))
    ids = torch.cat([TopKCache(cache_dir).get(k)[0] for k in TopKCache(cache_dir).keys()])
    assert int(ids.max()) < len(load_tokenizer(str(teacher)))
    cfg = load_config(DistillConfig, None, [
        f"student={student}", f"teacher_cache={cache_dir}", f"data.responses=[{{name: t, path: {data}}}]",
        "train.max_length=64", "train.batch_size=1", "train.grad_accum=1", "train.max_steps=2",
        "kd.w_attn=0", "models.device=cpu", f"out={tmp_path / 'run'}"])
    summary = run_distill(cfg)
    assert summary["steps"] == 2 and summary["final"]["kd"] > 0


# ---------------------------------------------------------------- reference: student with LoRA on the head


def test_starting_weights_teacher_is_the_base_model_with_lora_on_the_head(tokenizer):
    import copy

    from peft import LoraConfig, get_peft_model

    base = tiny_family("granite", tokenizer, seed=7)
    reference = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"]))
    torch.manual_seed(8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # trained adapters: the LoRA model is not its starting point any more
    examples = [TrainExample(str(i), tokenize_example(tokenizer, c)) for i, c in enumerate(CHATS)]
    micro = collate(examples, tokenizer.pad_token_id)
    teacher = StartingWeightsTeacher(model, vocab=None, student_device=torch.device("cpu"))
    signal = teacher(micro).routes[0].signal
    with torch.no_grad():
        got = signal.post_head(signal.head(signal.hidden).float())
        want = reference(input_ids=micro.input_ids, attention_mask=micro.attention_mask).logits.float()
        adapted = model(input_ids=micro.input_ids, attention_mask=micro.attention_mask).logits.float()
    real = micro.attention_mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    assert (adapted[real] - want[real]).abs().max() > 1e-2  # the adapters do change the head's output
