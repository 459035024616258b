"""Teachers: what the training step asks a teacher for, and the teachers that answer it.

A teacher is called on a micro-batch (``Micro``: padded ids, mask, labels, example keys) and returns a typed
``TeacherSignal``: a list of ``Route``s, each naming the rows of the micro-batch it covers and the
``HeadSignal`` for them. One route over every row is plain distillation; DAE (`align`) routes domain rows to
the expert and the others to the reference model, and ``DistillModule`` runs the head loss once per route. So
`distill` is `align` with a single route, and every teacher below plugs into the same step.

A ``HeadSignal`` carries the teacher's next-token distribution in one of two forms:

- ``hidden`` + ``head`` (+ ``post_head``): the teacher's final hidden states and its output head, applied chunk by
  chunk inside the fused KD loss (no vocabulary-sized tensor for the whole batch);
- ``topk``: (ids, log-probs) per loss position, as the offline cache stores them (or a server returns them).

and, for attention KD, the teacher's captured queries/keys (``attention``). Implementations: ``OnlineTeacher``
(a frozen model beside the student, optionally sharded by FSDP2 / ZeRO-3), ``CachedTeacher`` (the offline top-k
cache), ``StartingWeightsTeacher`` (a LoRA student with its adapters off) and ``RoutedTeacher`` (one teacher per
route). The next ones are the same interface: a teacher scoring the student's own samples (on-policy KD) is
called on micro-batches the student generated; a teacher behind a server fills ``topk`` from the server's prompt
log-probabilities.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

from teacherfit.distill.attention import AttentionCapture
from teacherfit.distill.examples import Micro
from teacherfit.models import decoder_of, output_head
from teacherfit.scoring import PostHead, active_post_head


@dataclass
class HeadSignal:
    """One teacher's targets for some rows of a micro-batch (tensors on the student's device)."""

    hidden: Tensor | None = None  # [rows, T, d] final hidden states, with ``head`` (and ``post_head``)
    head: Callable[[Tensor], Tensor] | None = None
    post_head: PostHead | None = None
    topk: tuple[Tensor, Tensor] | None = None  # ([N, k] ids, [N, k] log-probs) per loss position
    divergence_kwargs: dict[str, float] | None = None  # how these rows are read (a cache's tail draws)
    attention: dict[int, Any] | None = None  # captured q/k per teacher layer, for attention KD


@dataclass
class Route:
    """The rows of a micro-batch one teacher covers (``rows`` None: every row) and its signal for them
    (None: the route has no row in this micro-batch)."""

    name: str
    rows: Tensor | None
    signal: HeadSignal | None


@dataclass
class TeacherSignal:
    routes: list[Route] = field(default_factory=list)


class Teacher(Protocol):
    """The interface the training step calls: a signal per micro-batch; ``close`` releases hooks."""

    def __call__(self, micro: Micro) -> TeacherSignal: ...

    def close(self) -> None: ...


class SingleTeacher:
    """A teacher with one signal for every row; subclasses implement ``head_signal``."""

    name = "teacher"
    collective = False  # its forward takes part in collectives (sharded): every process must call it alike

    def head_signal(self, micro: Micro) -> HeadSignal:
        raise NotImplementedError

    def __call__(self, micro: Micro) -> TeacherSignal:
        return TeacherSignal([Route(self.name, None, self.head_signal(micro))])

    def close(self) -> None:
        pass


def _hidden(model: nn.Module, micro: Micro, device: torch.device) -> Tensor:
    return decoder_of(model)(input_ids=micro.input_ids.to(device),
                             attention_mask=micro.attention_mask.to(device)).last_hidden_state


class OnlineTeacher(SingleTeacher):
    """A frozen model run beside the student (same or another device), in inference mode.

    ``sharded``: its decoder layers were sharded across the processes (FSDP2 / ZeRO-3, ``launch.shard_frozen``);
    each forward then gathers them layer by layer, so every process must call it on every micro-batch."""

    def __init__(self, model: nn.Module, *, vocab: int | None, attn_layers: list[int] | None,
                 device: torch.device, student_device: torch.device, sharded: bool = False):
        self.model = model.eval().requires_grad_(False)
        head = output_head(model, vocab)
        # the KD chunks run where the student's hidden states are: a copy of the head only if devices differ
        self.head = head if device == student_device else copy.deepcopy(head).to(student_device)
        self.post_head = active_post_head(model)  # before the capture hooks: the check runs a forward
        self.device, self.student_device = device, student_device
        self.collective = sharded
        self.capture = AttentionCapture(model, attn_layers) if attn_layers else None
        if self.capture is not None:
            self.capture.__enter__()

    def head_signal(self, micro: Micro) -> HeadSignal:
        if self.capture is not None:
            self.capture.clear()
        with torch.no_grad():
            hidden = _hidden(self.model, micro, self.device)
        attention = None
        if self.capture is not None:
            attention = {k: v._replace(query=v.query.to(self.student_device), key=v.key.to(self.student_device))
                         for k, v in self.capture.captured.items()}
        return HeadSignal(hidden=hidden.to(self.student_device), head=self.head, post_head=self.post_head,
                          attention=attention)

    def close(self) -> None:
        if self.capture is not None:
            self.capture.__exit__(None, None, None)


class AdaptersOff:
    """A LoRA model's output head called with every adapter switched off (the head's own adapter included).

    The KD chunks call the teacher head after the teacher's forward has returned, so a head that carries an
    adapter (``target_modules`` with ``lm_head``) must switch the adapters off itself at each call."""

    def __init__(self, model: nn.Module, head: nn.Module):
        self.model, self.head = model, head

    def __call__(self, hidden: Tensor) -> Tensor:
        with self.model.disable_adapter():
            return self.head(hidden)


class StartingWeightsTeacher(SingleTeacher):
    """The student's own starting weights as a frozen teacher, at no memory cost: a LoRA student with its
    adapters switched off (``peft``'s ``disable_adapter``) is exactly the model it started from.

    For DAE's general reference this keeps, on non-domain samples, what the student already did. The adapters
    are off for the whole teacher: the decoder here and the output head in the KD chunks (``AdaptersOff``).
    """

    def __init__(self, model: nn.Module, *, vocab: int | None, student_device: torch.device):
        if not hasattr(model, "disable_adapter"):
            raise ValueError("the starting-weights teacher needs a LoRA student (set `lora`), or give the model itself")
        self.model, self.student_device = model, student_device
        self.head = AdaptersOff(model, output_head(model, vocab))
        self.post_head = active_post_head(model)

    def head_signal(self, micro: Micro) -> HeadSignal:
        with torch.no_grad(), self.model.disable_adapter():
            hidden = _hidden(self.model, micro, self.student_device)
        return HeadSignal(hidden=hidden.detach(), head=self.head, post_head=self.post_head)


class CachedTeacher(SingleTeacher):
    """The teacher's top-k distributions read from an offline cache (no teacher in memory)."""

    def __init__(self, cache, student_device: torch.device):
        self.cache, self.student_device = cache, student_device
        self.loss_kwargs = cache.loss_kwargs()  # how this cache's rows are read (tail draws), sent with each batch

    def head_signal(self, micro: Micro) -> HeadSignal:
        ids, logprobs = self.cache.collate(micro.keys, micro.labels[:, 1:])
        return HeadSignal(topk=(ids.to(self.student_device), logprobs.to(self.student_device)),
                          divergence_kwargs=self.loss_kwargs or None)


class RoutedTeacher:
    """DAE's teachers: one per route (e.g. the domain expert and the general reference model), and the route of
    every training example (by key).

    Per micro-batch, each teacher runs on its own rows only (a sub-batch of the same padded width, so positions
    line up with the student's). Teachers are built by their factories on first use, in route order, so a route
    no example takes never loads its model; ``eager`` builds them all at once (several processes: a sharded
    teacher's forward is a collective, so every process builds it and calls it on every micro-batch, on one
    stand-in row when none of its rows take that route).
    """

    def __init__(self, factories: dict[str, Callable[[], SingleTeacher]], route_of: dict[str, str], *,
                 eager: bool = False):
        unknown = set(route_of.values()) - set(factories)
        if unknown:
            raise ValueError(f"examples routed to {sorted(unknown)}, which have no teacher")
        self.factories, self.route_of = factories, route_of
        self.teachers: dict[str, SingleTeacher] = {}
        if eager:
            for name in factories:
                if name in set(route_of.values()):
                    self.teacher(name)

    def teacher(self, name: str) -> SingleTeacher:
        if name not in self.teachers:
            self.teachers[name] = self.factories[name]()
        return self.teachers[name]

    def __call__(self, micro: Micro) -> TeacherSignal:
        routes = []
        for name in self.factories:
            rows = [i for i, key in enumerate(micro.keys) if self.route_of[key] == name]
            index = torch.tensor(rows, dtype=torch.long)
            signal = None
            if rows:
                signal = self.teacher(name).head_signal(micro.select(index))
            elif name in self.teachers and self.teachers[name].collective:
                self.teachers[name].head_signal(micro.select(torch.zeros(1, dtype=torch.long)))  # keep in step
            routes.append(Route(name, index, signal))
        return TeacherSignal(routes)

    def close(self) -> None:
        for teacher in self.teachers.values():
            teacher.close()
