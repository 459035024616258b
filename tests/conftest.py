import importlib.util
import os
import sys
from pathlib import Path

# Nothing in the tests downloads: say so before huggingface_hub reads its constants, so that resolving a hub
# id never tries the network (the one test of the online check sets its own loopback endpoint).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import save_tiny, tiny_llama, tiny_qwen2, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def base_tokenizer():
    """A tokenizer with no chat template, like a base model's."""
    return tiny_tokenizer(chat_template=False)


@pytest.fixture(scope="session")
def llama(tokenizer):
    return tiny_llama(tokenizer)


@pytest.fixture(scope="session")
def qwen2(tokenizer):
    return tiny_qwen2(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama saved as a Hugging Face folder."""
    return save_tiny(tiny_llama(tokenizer), tokenizer, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def llama_server():
    """A real llama.cpp OpenAI-compatible server on loopback serving the packaged SmolLM2-135M-Instruct."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not installed (pip install 'llama-cpp-python[server]')")
    from servers import llama_cpp_server
    from teacherfit.models import packaged_gguf_path

    with llama_cpp_server(packaged_gguf_path("smollm2-135m-instruct"), model_alias="smollm2") as base_url:
        yield base_url
