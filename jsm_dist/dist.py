"""Distributed world info and collectives that also work in a single plain process.

Everything distributed outside accelerate goes through here: the label store, the
refinement pass and the loaders ask this module for rank/world and for barriers, so they
run unchanged under ``accelerate launch`` / torchrun / srun and under ``python -m``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _torch_dist():
    import torch.distributed as td

    return td if td.is_available() and td.is_initialized() else None


def world_info() -> WorldInfo:
    """Rank and world size: from an initialised process group, else from the environment.

    The environment fallback reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK, then SLURM's
    SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (one task per process).
    """
    td = _torch_dist()
    if td is not None:
        local = int(os.environ.get("LOCAL_RANK", td.get_rank()))
        return WorldInfo(td.get_rank(), td.get_world_size(), local)
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorldInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "JSM_USE_SLURM_RANKS" in env:
        return WorldInfo(
            int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        )
    return WorldInfo()


def barrier() -> None:
    """Wait for every rank; a no-op without an initialised process group."""
    td = _torch_dist()
    if td is not None and td.get_world_size() > 1:
        td.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (identity in a single process)."""
    td = _torch_dist()
    if td is None or td.get_world_size() == 1:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """List of every rank's ``obj`` in rank order (``[obj]`` in a single process)."""
    td = _torch_dist()
    if td is None or td.get_world_size() == 1:
        return [obj]
    out = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out


def gather_object(obj, dst: int = 0) -> list | None:
    """List of every rank's ``obj`` in rank order on rank ``dst``, None on the others
    (``[obj]`` in a single process)."""
    td = _torch_dist()
    if td is None or td.get_world_size() == 1:
        return [obj]
    out = [None] * td.get_world_size() if td.get_rank() == dst else None
    td.gather_object(obj, out, dst=dst)
    return out


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of a short list of floats over ranks."""
    td = _torch_dist()
    if td is None or td.get_world_size() == 1:
        return list(values)
    import torch

    t = torch.tensor(values, dtype=torch.float64)
    td.all_reduce(t)
    return t.tolist()


def all_reduce_tensor(tensor):
    """Sum ``tensor`` over ranks in place and return it (unchanged in a single process).

    The tensor must live where the backend reduces (CPU for gloo, the GPU for NCCL), and
    every rank must pass one of the same shape and dtype.
    """
    td = _torch_dist()
    if td is not None and td.get_world_size() > 1:
        td.all_reduce(tensor)
    return tensor


def derive_seed(seed: int, *parts: int) -> int:
    """Deterministic 31-bit seed from a base seed and (rank, worker, epoch, ...)."""
    import hashlib

    h = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def owner_of_shard(shard: int, world_size: int) -> int:
    """The rank that owns (refines, writes) label shard ``shard``: round-robin."""
    return shard % world_size


def using_deepspeed() -> bool:
    """True when launched with ``accelerate launch --use_deepspeed`` (or a DeepSpeed yaml)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def make_accelerator(
    *,
    force_cpu: bool = False,
    mixed_precision: str = "no",
    grad_accum: int = 1,
    find_unused_parameters: bool = True,
):
    """The run's ``Accelerator``, set up for the hardware and the launcher at hand.

    CUDA: NCCL (DDP or DeepSpeed as launched). No CUDA: ``cpu=True`` for DDP over gloo, or
    a gloo process group for DeepSpeed (see ``launcher.accelerator_kwargs``). Fails, never
    hangs, when DeepSpeed is combined with CPU forcing or when the launcher's world size
    disagrees with the accelerator's (``launcher.verify_world``).
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from jsm_dist import launcher

    if using_deepspeed() and force_cpu:
        raise ValueError(
            "DeepSpeed cannot be combined with train.cpu=true / accelerate --cpu: "
            "launch without --use_deepspeed for CPU-only DDP, or drop --cpu"
        )
    kwargs = launcher.accelerator_kwargs(cuda_available=torch.cuda.is_available() and not force_cpu)
    if force_cpu and not using_deepspeed():
        kwargs = {"cpu": True}
    if kwargs.get("cpu") or not torch.cuda.is_available():
        mixed_precision = "no"  # fp16/bf16 autocast on CPU only slows these convolutions
    handlers = kwargs.pop("kwargs_handlers", [])
    handlers.append(DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters))
    acc = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        kwargs_handlers=handlers,
        **kwargs,
    )
    launcher.verify_world(acc)
    return acc


def fault_point(name: str, value: int | None = None) -> None:
    """Fault injection for crash tests: SIGKILL this process at a named point.

    ``JSM_FAULT=<name>[:<value>]`` (and optionally ``JSM_FAULT_RANK=<rank>``, default 0)
    kills the matching rank with SIGKILL — a real, unclean death, no cleanup — when the
    run reaches ``fault_point(name, value)``. Unset (always, outside tests) it does nothing.
    """
    spec = os.environ.get("JSM_FAULT")
    if not spec:
        return
    want, _, val = spec.partition(":")
    if want != name or (val and value is not None and int(val) != value):
        return
    if world_info().rank != int(os.environ.get("JSM_FAULT_RANK", "0")):
        return
    import signal
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
