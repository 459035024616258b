"""Processes of one run: one, or several started by ``accelerate launch`` / torchrun.

Every command that can run on several processes joins them here, so the decisions about devices, backends and
which process writes live in one place: ``Processes`` for the data-parallel stages (rank's sharded scoring,
cache-teacher's sharded rows, the main-only stages of study and align), ``training_accelerator`` for the
training runtime (DDP, FSDP2, DeepSpeed), which also checks that the distribution a launch asked for is the
one in effect.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any

from teacherfit.config import ConfigError, ModelOptions
from teacherfit.ui import console


class Processes:
    """The processes one rank run is spread over: one, or several launched by ``accelerate launch`` / torchrun
    (accelerate's ``PartialState``: gloo on CPUs, NCCL on GPUs, each process on its own device)."""

    def __init__(self, state: Any = None, owned: bool = False):
        self.state = state
        self.owned = owned  # the process group was started here (and is ended by ``close``)
        self.rank = state.process_index if state is not None else 0
        self.world = state.num_processes if state is not None else 1
        self.device = str(state.device) if state is not None else None  # None: models.device as configured

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    def from_main(self, value: Any) -> Any:
        """The main process's ``value`` on every process (the others pass anything)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextmanager
    def main_first(self):
        """The main process runs the block first (files it may write: verified GGUFs...), the others after it."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist
            from accelerate import PartialState

            if dist.is_initialized():
                dist.destroy_process_group()
            PartialState._reset_state()
            self.owned = False


def launched_processes() -> int:
    """How many processes the launcher started (torchrun / accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def start_processes(models: ModelOptions) -> Processes:
    """Join the other processes of this run (one process: nothing to join). Each scores on ``cuda:LOCAL_RANK``
    (GPUs shared round-robin when there are more processes than GPUs), or on the CPU when ``models.device`` is cpu
    or there is no GPU."""
    world = launched_processes()
    if world <= 1:
        return Processes()
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    device = models.device
    on_cpu = device == "cpu" or not torch.cuda.is_available()
    if not on_cpu:
        if device not in ("auto", "cuda"):
            raise ConfigError(f"models.device={device!r} names one device, but {world} processes were launched: "
                              "each process scores on its own GPU (cuda:LOCAL_RANK); set models.device=auto (or cpu)")
    local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    # More processes on a machine than GPUs: they share the GPUs round-robin (small models, where one process
    # cannot keep a GPU busy). NCCL allows one process per GPU, so they talk over gloo: a rank run's collectives
    # are barriers and small Python objects, never tensors on the GPU.
    shared = not on_cpu and int(os.environ.get("LOCAL_WORLD_SIZE", str(world))) > gpus
    owned = not dist.is_initialized()
    # a long wait at a barrier is normal here (a process converting a GGUF, or a slower share of the rows)
    state = PartialState(cpu=on_cpu or shared, timeout=timedelta(hours=2))
    procs = Processes(state, owned=owned)
    if shared:
        procs.device = f"cuda:{local % gpus}"
        if procs.main:
            console.print(f"[yellow]note:[/] {os.environ.get('LOCAL_WORLD_SIZE', world)} processes share this machine's "
                          f"{gpus} GPU(s) (cuda:LOCAL_RANK % {gpus}), talking over gloo")
    return procs


@contextmanager
def quiet(on: bool):
    """Silence this process's console in the block (the other processes of a run: the main one reports)."""
    before = console.quiet
    console.quiet = before or on
    try:
        yield
    finally:
        console.quiet = before
