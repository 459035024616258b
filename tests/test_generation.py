
from teacherfit.generation import DecodingConfig, TransformersGenerator, stop_token_ids
from teacherfit.models import LoadedModel

PROMPTS = [
    [{"role": "user", "content": "Write a short poem about the sea."}],
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "List three colours, please, with a reason for each."}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "def add(a, b):"}],
]


def _generator(model, tokenizer, batch_size):
    import torch

    loaded = LoadedModel(model, tokenizer, {"model": "tiny"}, torch.device("cpu"), torch.float32)
    return TransformersGenerator(loaded, batch_size=batch_size)


def _run(gen, decoding):
    out = dict(gen.generate(PROMPTS, decoding))
    assert sorted(out) == list(range(len(PROMPTS)))
    return out


def test_batched_greedy_equals_one_at_a_time(llama, tokenizer):
    decoding = DecodingConfig(max_new_tokens=12)
    batched = _run(_generator(llama, tokenizer, 8), decoding)
    single = _run(_generator(llama, tokenizer, 1), decoding)
    for i in range(len(PROMPTS)):
        assert batched[i][0].text == single[i][0].text
        assert batched[i][0].completion_tokens == single[i][0].completion_tokens


def test_completion_accounting(llama, tokenizer):
    out = _run(_generator(llama, tokenizer, 2), DecodingConfig(max_new_tokens=7))
    for i, (c,) in out.items():
        expected_prompt = len(tokenizer.apply_chat_template(PROMPTS[i], add_generation_prompt=True, tokenize=False)
                              and tokenizer(tokenizer.apply_chat_template(PROMPTS[i], add_generation_prompt=True,
                                                                          tokenize=False), add_special_tokens=False)["input_ids"])
        assert c.prompt_tokens == expected_prompt
        assert 1 <= c.completion_tokens <= 7
        assert c.finish_reason in ("stop", "length")
        assert (c.finish_reason == "length") == (c.completion_tokens == 7 and "<|im_end|>" not in c.text)


def test_stops_on_end_of_turn(llama, tokenizer):
    """Bias the model towards <|im_end|>: every completion must stop after one token with finish 'stop'."""
    import copy

    import torch

    model = copy.deepcopy(llama)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.lm_head.out_features))
        model.lm_head.bias[eos] = 1e4
    out = _run(_generator(model, tokenizer, 3), DecodingConfig(max_new_tokens=9))
    for (c,) in out.values():
        assert c.finish_reason == "stop" and c.completion_tokens == 1 and c.text == ""


def test_sampling_n_candidates_seeded(llama, tokenizer):
    decoding = DecodingConfig(max_new_tokens=6, temperature=1.0, n=3, seed=7)
    a = _run(_generator(llama, tokenizer, 4), decoding)
    b = _run(_generator(llama, tokenizer, 4), decoding)
    assert all(len(v) == 3 for v in a.values())
    assert [[c.text for c in a[i]] for i in a] == [[c.text for c in b[i]] for i in b]
    assert any(len({c.text for c in a[i]}) > 1 for i in a)  # real sampling, not greedy copies


def test_stop_token_ids_include_end_of_turn(tokenizer):
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tokenizer)
