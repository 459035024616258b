
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


# ----------------------------------------------------------------------------------------- vLLM engine settings

import importlib.util  # noqa: E402

import pytest  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from teacherfit.generation import VLLMEngineConfig, check_vllm_engine  # noqa: E402

VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None


def test_vllm_engine_settings_are_typed_and_strict():
    engine = VLLMEngineConfig(tensor_parallel_size=8, max_model_len=8192, gpu_memory_utilization=0.85,
                              dtype="bfloat16", quantization="fp8", engine_args={"enable_prefix_caching": True})
    kwargs = engine.engine_kwargs(fields={"tensor_parallel_size", "pipeline_parallel_size", "max_model_len",
                                          "gpu_memory_utilization", "dtype", "quantization", "seed", "enforce_eager",
                                          "enable_prefix_caching"})
    assert kwargs == {"tensor_parallel_size": 8, "pipeline_parallel_size": 1, "max_model_len": 8192,
                      "gpu_memory_utilization": 0.85, "dtype": "bfloat16", "quantization": "fp8", "seed": 0,
                      "enforce_eager": False, "enable_prefix_caching": True}
    for bad in ({"tensor_parallel_sise": 8}, {"gpu_memory_utilization": 1.5}, {"tensor_parallel_size": 0},
                {"dtype": "bf16"}):
        with pytest.raises(ValidationError):
            VLLMEngineConfig(**bad)
    with pytest.raises(ValueError, match=r"engine_args: tensor_parallel_size has its own field"):
        VLLMEngineConfig(engine_args={"tensor_parallel_size": 2}).engine_kwargs()
    with pytest.raises(ValueError, match=r"'enable_prefix_cachng' is not a field .*did you mean 'enable_prefix_caching'"):
        VLLMEngineConfig(engine_args={"enable_prefix_cachng": True}).engine_kwargs(
            fields=set(VLLMEngineConfig.model_fields) | {"enable_prefix_caching"})


def test_vllm_settings_digest_leaves_out_resources_only():
    base = VLLMEngineConfig().digest_fields()
    assert VLLMEngineConfig(tensor_parallel_size=8, gpu_memory_utilization=0.5, enforce_eager=True,
                            chunk_size=7).digest_fields() == base  # how the work is spread: same responses
    for changed in ({"dtype": "float16"}, {"max_model_len": 4096}, {"quantization": "fp8"}, {"seed": 1},
                    {"engine_args": {"max_num_seqs": 8}}):
        assert VLLMEngineConfig(**changed).digest_fields() != base, changed


def test_teacher_vllm_block_only_with_the_vllm_backend():
    from teacherfit.config import ConfigError, TeacherConfig

    teacher = TeacherConfig(name="big", backend="vllm", model="Qwen/Qwen2.5-72B-Instruct",
                            vllm={"tensor_parallel_size": 8})
    teacher.check_backend()
    assert teacher.engine.tensor_parallel_size == 8
    assert TeacherConfig(name="d", backend="vllm", model="m").engine == VLLMEngineConfig()
    with pytest.raises(ConfigError, match="need backend 'vllm'"):
        TeacherConfig(name="t", model="m", vllm={"tensor_parallel_size": 2}).check_backend()


@pytest.mark.skipif(VLLM_INSTALLED, reason="vLLM is installed here: the not-installed message cannot show")
def test_vllm_backend_without_vllm_is_one_clear_line_before_any_model(tmp_path):
    import subprocess
    import sys

    import yaml

    instr = tmp_path / "i.jsonl"
    instr.write_text('{"instruction": "hi"}\n')
    cfg = tmp_path / "g.yaml"
    cfg.write_text(yaml.safe_dump({"instructions": str(instr), "out": str(tmp_path / "out"), "teachers": [
        {"name": "big", "backend": "vllm", "model": "Qwen/Qwen2.5-72B-Instruct", "vllm": {"tensor_parallel_size": 8}}]}))
    proc = subprocess.run([sys.executable, "-m", "teacherfit", "generate", "-c", str(cfg)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = (proc.stdout + proc.stderr).strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert any("backend 'vllm' needs vLLM, which is not installed" in line and "make install-gpu" in line for line in err)
    assert not (tmp_path / "out").exists()  # refused before the run started


@pytest.mark.skipif(not VLLM_INSTALLED, reason="vLLM is not installed here (it needs a CUDA machine: make install-gpu)")
def test_vllm_engine_fields_are_the_installed_engine_args():
    import dataclasses

    from vllm import EngineArgs

    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    typed = set(VLLMEngineConfig.model_fields) - {"engine_args", "chunk_size"}
    assert typed <= fields, typed - fields
    with pytest.raises(ValueError, match="is not a field of the installed vLLM's EngineArgs"):
        check_vllm_engine(VLLMEngineConfig(engine_args={"no_such_engine_arg": 1}), "vllm")
