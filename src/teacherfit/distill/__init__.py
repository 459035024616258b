"""Distillation: transfer a chosen teacher into the student (docs/papers.md section 2).

This package holds the distillation engine: the loss functions (``teacherfit.distill.losses``: logit
divergences on full or top-k teacher distributions, attention-map KL, and a memory-bounded chunked path
through the LM head), and the training phases built on them (logit + attention KD, then Domain Alignment
from Expert). Losses are pure functions that return means or sums over response tokens; how they are
weighted and normalised across gradient accumulation is decided by the training loop, in view.
"""
