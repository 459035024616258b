"""Tiny real models and tokenizers built in the tests (no download, a few ms to build).

The tokenizer is a real byte-level BPE trained here on a small corpus, with a ChatML chat template;
the models are real transformers architectures (Llama, Qwen2, Gemma3) with 2 layers and hidden 32.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Write a short poem about the sea and the sky.",
    "Explain how a neural network learns from data, step by step.",
    "def add(a, b):\n    return a + b\n",
    "Translate 'good morning' into French: bonjour.",
    "List three colours: red, green and blue.",
    "What is the capital of France? Paris is the capital of France.",
    "Sure! Here is an answer with numbers 0123456789 and symbols !?.,;:'\"()[]{}<>-_=+*/#",
] * 4

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 320, chat_template: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token=None
    )
    if chat_template:
        fast.chat_template = CHATML
    return fast


def _tiny_config(cls, tokenizer, *, layers: int, hidden: int, **extra):
    return cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )


def tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0, layers: int = 2, hidden: int = 32):
    torch.manual_seed(seed)
    cfg = _tiny_config(LlamaConfig, tokenizer, layers=layers, hidden=hidden, bos_token_id=None,
                       tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_qwen2(tokenizer: PreTrainedTokenizerFast, seed: int = 1, layers: int = 2, hidden: int = 32):
    torch.manual_seed(seed)
    cfg = _tiny_config(Qwen2Config, tokenizer, layers=layers, hidden=hidden, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_reward_model(tokenizer: PreTrainedTokenizerFast, seed: int = 5):
    """A one-layer Llama sequence classifier with one label: a real (random) classifier reward model."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id))


def save_tiny(model, tokenizer, path: Path) -> Path:
    """Write a tiny model + tokenizer as a Hugging Face folder (safetensors)."""
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
