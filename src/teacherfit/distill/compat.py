"""Teacher/student compatibility checks for logit and attention KD (pure functions, run before any compute).

Logit and attention KD compare the two models position by position and token id by token id, so they
need the same tokenizer. Vocabulary *rows* may differ when one model pads its embedding matrix (e.g. to a
multiple of 64): rows past the tokenizer's last id are never a real token and are dropped from both heads.
Anything else is refused, pointing to sequence-level KD (train on the teacher's generated responses),
which works across tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SEQUENCE_KD_HINT = (
    "Use sequence-level KD instead: generate the teacher's responses (`teacherfit generate`) and train on "
    "them with `--set kd.lambda=0` (plain SFT on the teacher's outputs), which works across tokenizers."
)


class KDIncompatible(ValueError):
    """The teacher cannot be distilled into this student token by token."""


@dataclass
class Compatibility:
    vocab: int | None  # slice both heads to this many rows (None: sizes already equal)
    notes: list[str] = field(default_factory=list)


def check_kd_compatibility(student_tok, teacher_tok, *, student_rows: int, teacher_rows: int,
                           student_name: str = "student", teacher_name: str = "teacher") -> Compatibility:
    """Refuse mismatched tokenizers; allow padded vocabulary rows; note chat-template differences."""
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab != t_vocab:
        only_s = len(set(s_vocab.items()) - set(t_vocab.items()))
        only_t = len(set(t_vocab.items()) - set(s_vocab.items()))
        raise KDIncompatible(
            f"logit and attention KD need the same tokenizer, but {teacher_name} ({len(t_vocab)} tokens) and "
            f"{student_name} ({len(s_vocab)} tokens) differ: {only_s} token->id pairs only in the student, "
            f"{only_t} only in the teacher. {SEQUENCE_KD_HINT}"
        )
    for attr in ("eos_token_id", "bos_token_id"):
        if getattr(student_tok, attr) != getattr(teacher_tok, attr):
            raise KDIncompatible(f"{attr} differs between {student_name} and {teacher_name}. {SEQUENCE_KD_HINT}")
    n_tokens = len(s_vocab)
    notes = []
    if min(student_rows, teacher_rows) < n_tokens:
        raise KDIncompatible(
            f"an output head has fewer rows than the tokenizer has tokens ({student_name}: {student_rows}, "
            f"{teacher_name}: {teacher_rows}, tokenizer: {n_tokens}). {SEQUENCE_KD_HINT}")
    vocab = None
    if student_rows != teacher_rows:
        vocab = min(student_rows, teacher_rows)
        notes.append(f"output heads differ only in padded rows ({student_rows} vs {teacher_rows}); "
                     f"both are compared on their first {vocab} rows")
    if getattr(student_tok, "chat_template", None) != getattr(teacher_tok, "chat_template", None):
        notes.append("the chat templates differ: examples are rendered with the student's template for both models")
    return Compatibility(vocab, notes)
