"""Processes of one run: one, or several started by ``accelerate launch`` / torchrun.

Every command that can run on several processes joins them here, so the decisions about devices, backends and
which process writes live in one place: ``Processes`` for the data-parallel stages (rank's sharded scoring,
cache-teacher's sharded rows), ``is_main_process`` for what only the main process writes (summaries, reports,
align's held-out and judged scores), ``training_accelerator`` for the training runtime (DDP, FSDP2, DeepSpeed),
which also checks that the distribution a launch asked for is the one in effect.
"""

from __future__ import annotations

import os
import sys
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
            wait_for_everyone(self.state)

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
            from accelerate import PartialState

            leave_process_group()
            PartialState._reset_state()
            self.owned = False


def wait_for_everyone(state: Any) -> None:
    """Every process of the run reaches this point (accelerate's ``PartialState`` or ``Accelerator``)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        # torch's own barrier: accelerate before 1.16 passes device_ids=[LOCAL_RANK] on gloo too, and on a machine
        # with CUDA torch then runs it on cuda:LOCAL_RANK, which process 1 of 2 sharing one GPU (or any process of a
        # CPU run there) may not have: seen on an H200, where `rank` with 2 processes on 1 GPU died at its first one.
        dist.barrier()
    else:
        state.wait_for_everyone()


def leave_process_group() -> None:
    """End this process's part in a launched run once its command has finished (torch asks for it before exit:
    left to the interpreter's shutdown, gloo's threads once aborted the second process of a finished 2-process
    FSDP2 run, "terminate called without an active exception"). Nothing to do in one process."""
    dist = sys.modules.get("torch.distributed")  # not imported: no process group to leave
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


# ---------------------------------------------------------------- training: the Accelerator, checked

REQUESTS = {"single": "one process", "ddp": "data parallel (DDP)", "fsdp2": "FSDP2 (torch fully_shard)",
            "deepspeed": "DeepSpeed"}


def requested_distribution() -> str:
    """What the launch asked for, from the environment ``accelerate launch`` sets from its config (torchrun alone:
    DDP): 'deepspeed', 'fsdp2', 'fsdp1', 'ddp' or 'single'."""
    def flag(name: str) -> bool:
        return os.environ.get(name, "false").lower() in ("1", "true", "yes")

    if flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if flag("ACCELERATE_USE_FSDP"):
        return "fsdp2" if os.environ.get("FSDP_VERSION", "1") == "2" else "fsdp1"
    return "ddp" if launched_processes() > 1 else "single"


def training_accelerator(models: ModelOptions, opts: Any, *, project_dir: Any = None):
    """The Accelerator of a training run, with the distribution the launch asked for really in effect.

    Mixed precision: bf16 (fp16 without bf16 support) autocast on CUDA over fp32 master weights, unless
    ``models.dtype`` is float32; none on the CPU. Gradient accumulation is ``train.grad_accum`` (what DeepSpeed's
    engine is told too); the schedule steps once per optimizer step on every launcher. FSDP2 on CPUs: accelerate
    enables FSDP on accelerators only (``Accelerator(cpu=True)`` silently runs plain DDP), while torch's
    ``fully_shard`` runs on the CPU over gloo; so on a CPU launch that asks for FSDP2, the accelerator is switched
    to accelerate's own FSDP2 path (the one GPUs take). A launch whose request is not in effect stops here with
    what to change, before any weights are read.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    want = requested_distribution()
    if want == "fsdp1":
        raise ConfigError("the launch asks for FSDP version 1; teacherfit trains with FSDP2 (torch's fully_shard): set "
                          "`fsdp_version: 2` in the accelerate config's fsdp_config (configs/accelerate/fsdp.yaml)")
    cpu = models.device == "cpu" or not torch.cuda.is_available()
    mixed = "no" if cpu or models.dtype in ("float32", "fp32") else (
        "bf16" if torch.cuda.is_bf16_supported() else "fp16")
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    # a long wait in a collective is normal here: the main process scores align's held-out sets (or converts a
    # GGUF) while the others wait for the first step
    group = {"timeout": timedelta(hours=2)}
    kwargs: dict[str, Any] = {"cpu": cpu, "mixed_precision": mixed, "gradient_accumulation_steps": opts.grad_accum,
                              "step_scheduler_with_optimizer": False,  # else it steps once per process per step
                              "log_with": list(opts.report_to) or None,
                              "project_dir": None if project_dir is None else str(project_dir)}
    if want == "deepspeed":
        kwargs["deepspeed_plugin"] = _deepspeed_plugin(opts, cpu)
        if cpu:
            # accelerate turns DeepSpeed off with cpu=True; DeepSpeed's own CPU accelerator runs it over gloo (the
            # backend must be named: with none, accelerate's state takes every process for the only one)
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            kwargs["cpu"] = False
            group["backend"] = "gloo"
    if want == "fsdp2":
        from accelerate.utils import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin()  # its settings from the launch's environment
    accelerator = Accelerator(**kwargs, kwargs_handlers=[InitProcessGroupKwargs(**group)])
    if want == "fsdp2" and accelerator.distributed_type == DistributedType.MULTI_CPU:
        from accelerate.state import PartialState

        # both shared states: AcceleratorState copies PartialState's each time it is constructed
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = kwargs["fsdp_plugin"]
    effective = {DistributedType.FSDP: "fsdp2" if accelerator.is_fsdp2 else "fsdp1",
                 DistributedType.DEEPSPEED: "deepspeed", DistributedType.NO: "single"}.get(
        accelerator.distributed_type, "ddp" if accelerator.num_processes > 1 else "single")
    if effective != want or accelerator.num_processes != launched_processes():
        raise ConfigError(
            f"the launch asked for {REQUESTS.get(want, want)} on {launched_processes()} process(es), but accelerate "
            f"runs {accelerator.distributed_type.value} on {accelerator.num_processes}: check the accelerate config "
            "(distributed_type, num_processes, use_cpu) and that the backend is installed (pip install deepspeed)")
    if want == "deepspeed":
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        theirs = ds.get("train_micro_batch_size_per_gpu", "auto")
        if theirs not in ("auto", None) and int(theirs) != opts.batch_size:
            raise ConfigError(f"the DeepSpeed config sets train_micro_batch_size_per_gpu={theirs} but "
                              f"train.batch_size={opts.batch_size}: set it to 'auto' or give the same value")
        ds["train_micro_batch_size_per_gpu"] = opts.batch_size
    if accelerator.num_processes > 1 and models.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"models.device={models.device!r} names one device, but {accelerator.num_processes} "
                          "processes train: each uses its own (accelerate's device); set models.device=auto (or cpu)")
    return accelerator


def _deepspeed_plugin(opts: Any, cpu: bool):
    """accelerate's DeepSpeed plugin from the launch's environment, with what teacherfit's config decides filled in:
    accumulation steps and clipping (a differing value in the accelerate config is refused, not mixed)."""
    try:
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin()
    except ImportError:
        raise ConfigError("the launch asks for DeepSpeed, which is not installed: pip install deepspeed") from None
    for key, ours, field in (("gradient_accumulation_steps", opts.grad_accum, "train.grad_accum"),
                             ("gradient_clipping", opts.max_grad_norm, "train.max_grad_norm")):
        theirs = plugin.deepspeed_config.get(key, "auto")
        if theirs not in ("auto", None) and float(theirs) != float(ours):
            raise ConfigError(f"the DeepSpeed config sets {key}={theirs} but {field}={ours}: set it to 'auto' in the "
                              f"accelerate config (teacherfit's {field} decides) or give the same value")
        plugin.deepspeed_config[key] = ours
    plugin.gradient_accumulation_steps = opts.grad_accum
    return plugin


def is_sharded(accelerator) -> bool:
    """Whether the student's weights are split across processes (FSDP, ZeRO-3): saving then needs a gather."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


def shard_frozen(model: Any, accelerator) -> bool:
    """Shard a frozen teacher across the processes the way the student is (FSDP2 / ZeRO-3), so a teacher larger
    than one device fits; returns whether it was sharded (its forward is then a collective).

    FSDP2: each decoder layer is ``fully_shard``-ed on its own (torch's API; gathered for its forward, freed after),
    so the bulk of the weights is split; embeddings, final norm and head stay whole on every process, because the
    KD chunks call the teacher's head outside its forward. ZeRO-3: ``deepspeed.initialize`` with an inference-only
    stage-3 config (no optimizer), as TRL prepares its GKD teacher."""
    from accelerate.utils import DistributedType

    if accelerator.num_processes == 1 or not is_sharded(accelerator):
        return False
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import fully_shard

        from teacherfit.models import decoder_of

        for layer in decoder_of(model).layers:
            fully_shard(layer, reshard_after_forward=True)
        return True
    import deepspeed

    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    config = {"train_micro_batch_size_per_gpu": ds["train_micro_batch_size_per_gpu"],
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "bf16": {"enabled": bool(ds.get("bf16", {}).get("enabled", False))},
              "fp16": {"enabled": bool(ds.get("fp16", {}).get("enabled", False))}}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.module.eval()
    return True


def is_main_process() -> bool:
    """Whether this is the process that writes a run's outputs (RANK 0 of a launch, or the only one)."""
    return int(os.environ.get("RANK", "0") or 0) == 0
