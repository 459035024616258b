import math

import pytest
import torch
import torch.nn.functional as F

from teacherfit.data import tokenize_example, tokenize_text
from teacherfit.scoring import length_sorted_batches, score_examples


def naive_loss(model, example):
    """Reference: one example alone, full logits, explicit sum of -log p over labelled next tokens."""
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    total, count = 0.0, 0
    for t in range(len(example.input_ids) - 1):
        target = example.labels[t + 1]
        if target != -100:
            total -= float(logp[t, target])
            count += 1
    return total, count


CHATS = [
    [{"role": "user", "content": "Write a short poem about the sea."}, {"role": "assistant", "content": "The sea is blue and wide."}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "List three colours."},
     {"role": "assistant", "content": "red, green and blue"}],
    [{"role": "user", "content": "Explain how a neural network learns from data, step by step, in detail please."},
     {"role": "assistant", "content": "It computes a loss, then gradients, then updates weights; repeat."}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
]


@pytest.mark.parametrize("max_tokens,max_batch", [(4096, 32), (64, 2), (1, 1)])
def test_batched_scores_match_naive_reference(llama, tokenizer, max_tokens, max_batch):
    examples = [tokenize_example(tokenizer, c) for c in CHATS] + [tokenize_text(tokenizer, "The quick brown fox.")]
    scored = score_examples(llama, examples, pad_token_id=tokenizer.pad_token_id, max_tokens=max_tokens,
                            max_batch=max_batch, head_chunk=3)
    for ex, got in zip(examples, scored):
        total, count = naive_loss(llama, ex)
        # a labelled first token has no context to be predicted from (text without BOS)
        assert got.n_tokens == count == sum(lab != -100 for lab in ex.labels[1:])
        assert got.nll_sum == pytest.approx(total, rel=1e-5, abs=1e-5)
        assert got.loss == pytest.approx(total / count, rel=1e-5)


def test_tied_embeddings_model_matches_reference(qwen2, tokenizer):
    examples = [tokenize_example(tokenizer, c) for c in CHATS]
    scored = score_examples(qwen2, examples, pad_token_id=tokenizer.pad_token_id, max_tokens=100)
    for ex, got in zip(examples, scored):
        total, _ = naive_loss(qwen2, ex)
        assert got.nll_sum == pytest.approx(total, rel=1e-5)


def test_no_labelled_tokens_gives_nan_loss(llama, tokenizer):
    ex = tokenize_example(tokenizer, CHATS[0], max_length=5)  # truncated inside the prompt
    assert ex.n_response_tokens == 0
    (got,) = score_examples(llama, [ex], pad_token_id=tokenizer.pad_token_id)
    assert got.n_tokens == 0 and math.isnan(got.loss)


def test_progress_callback_counts_rows_and_real_tokens(llama, tokenizer):
    examples = [tokenize_example(tokenizer, c) for c in CHATS]
    seen = []
    score_examples(llama, examples, pad_token_id=tokenizer.pad_token_id, max_tokens=60, max_batch=2,
                   on_batch=lambda rows, toks: seen.append((rows, toks)))
    assert sum(r for r, _ in seen) == len(examples)
    assert sum(t for _, t in seen) == sum(len(e.input_ids) for e in examples)


def test_length_sorted_batches_cover_each_index_once_within_budget():
    lengths = [5, 50, 7, 30, 30, 1, 12, 49, 3]
    batches = length_sorted_batches(lengths, max_tokens=100, max_batch=3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 100
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)


def test_padded_scores_match_the_reference_and_do_not_depend_on_their_batch(llama, tokenizer):
    """score_padded: each example at a width of its own length (a multiple of 64 here), batched only with
    examples of that width: the naive reference's values, and bit for bit the same whatever it is scored with."""
    from teacherfit.scoring import padded_width, score_padded

    assert [padded_width(n) for n in (1, 63, 64, 65, 300, 1000)] == [64, 64, 64, 128, 320, 1024]
    assert padded_width(100, cap=80) == 100 and padded_width(70, cap=100) == 100  # never past the context, never cut
    examples = [tokenize_example(tokenizer, c) for c in CHATS]
    kw = dict(pad_token_id=tokenizer.pad_token_id, max_tokens=4096)
    together = score_padded(llama, examples, **kw)
    for i, ex in enumerate(examples):
        total, count = naive_loss(llama, ex)
        assert together[i].n_tokens == count
        assert together[i].nll_sum == pytest.approx(total, rel=1e-5, abs=1e-5)
        alone = score_padded(llama, [ex], **kw)[0]
        with_others = score_padded(llama, [examples[(i + 1) % len(examples)], ex, examples[(i + 2) % len(examples)]],
                                   **kw)[1]
        assert alone.nll_sum == with_others.nll_sum == together[i].nll_sum  # batch-invariant, exactly
