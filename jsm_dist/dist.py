"""Distributed world info and collectives that also work in a single plain process.

Everything distributed outside accelerate goes through here: the label store, the
refinement pass and the loaders ask this module for rank/world and for barriers, so they
run unchanged under ``accelerate launch`` / torchrun / srun and under ``python -m``.

It also bounds how long a collective waits for the other ranks: every process group gets
``train.dist_timeout_s`` (a phase that legitimately waits longer, the refinement pass,
runs in :func:`long_phase` with its own), and :func:`describe_collective_failure` turns a
timeout into one line naming the phase and the setting to raise. A stopped rank thus ends
the job after the timeout (its peer exits non-zero, then torchrun kills the stopped one)
instead of after torch's default of 30 minutes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace

# How long a collective waits for the other ranks before the job fails (train.dist_timeout_s).
# torch's own default is 30 min on gloo: a stopped (not dead) peer would hang the job that long.
DEFAULT_TIMEOUT_S = 600.0

TRUE_VALUES = {"1", "true", "yes", "on"}  # how launchers spell a true environment flag


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


# ---- phases and collective timeouts ----------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """What the job is doing now and how long its collectives wait (for failure messages)."""

    name: str = "start-up"
    timeout_s: float = DEFAULT_TIMEOUT_S
    setting: str = "train.dist_timeout_s"  # the setting that raises timeout_s


_phase = Phase()


def current_phase() -> Phase:
    return _phase


def set_phase(name: str, *, timeout_s: float | None = None) -> None:
    """Enter phase ``name``: failure messages name it, and every process group of this
    rank waits ``timeout_s`` (default: the current phase's) in a collective from now on.

    Every group, not only the default one: a group made later (DeepSpeed makes its
    data-parallel groups in ``prepare``) starts with torch's default, 30 min on gloo, so
    the training phase is entered after ``prepare``.
    """
    global _phase
    _phase = replace(_phase, name=name, timeout_s=timeout_s or _phase.timeout_s)
    _apply_timeout(_phase.timeout_s)


@contextmanager
def long_phase(name: str, timeout_s: float, setting: str) -> Iterator[None]:
    """A phase whose collectives may legitimately wait longer than the job's timeout.

    Every collective in it (accelerate's, DDP's, DeepSpeed's, this module's, the label
    store's commit) waits up to ``timeout_s``; the job's timeout comes back on leaving.
    The timeout is this rank's setting of its process groups (gloo applies it to the
    collectives issued after the change, measured), so each rank sets it on entering.
    Outside a process group this only names the phase.
    """
    global _phase
    outer = _phase
    _phase = Phase(name, timeout_s, setting)
    _apply_timeout(timeout_s)
    try:
        yield
    except BaseException as e:
        if not hasattr(e, "jsm_phase"):  # caught outside: the message must name this phase
            e.jsm_phase = _phase
        raise
    finally:
        _phase = outer
        _apply_timeout(outer.timeout_s)


def _process_groups() -> list:
    """Every process group this rank belongs to (the default one first); [] without one."""
    td = _torch_dist()
    if td is None:
        return []
    c10d = td.distributed_c10d
    default = c10d._get_default_group()
    others = [g for g in c10d._world.pg_map if g is not default and not c10d._rank_not_in_group(g)]
    return [default, *others]


def _apply_timeout(timeout_s: float) -> None:
    from datetime import timedelta

    import torch.distributed as td

    for group in _process_groups():
        # torch has no public setter; torchtitan changes its groups' timeouts the same way
        td.distributed_c10d._set_pg_timeout(timedelta(seconds=timeout_s), group)


def group_timeouts_s() -> list[float | None]:
    """The timeout of every process group of this rank (default group first), as the
    backends hold it; [] without a process group.

    Read back rather than trusted: accelerate drops an ``InitProcessGroupKwargs`` value that
    equals its class default (600 s), which then became torch's 30 min on gloo; None for a
    backend that does not expose its options.
    """
    import torch

    out = []
    for group in _process_groups():
        seconds = None
        for device in ("cpu", "cuda"):
            try:
                seconds = group._get_backend(torch.device(device)).options._timeout
                seconds = seconds.total_seconds()
                break
            except (AttributeError, RuntimeError, ValueError):
                continue
        out.append(seconds)
    return out


def group_timeout_s() -> float | None:
    """The default process group's timeout (None without one); see group_timeouts_s."""
    return (group_timeouts_s() or [None])[0]


# gloo and NCCL say so in these words when a collective waited past its timeout ...
_TIMEOUT_MARKS = ("timed out", "timeout")
# ... and in these when a peer process went away in the middle of one
_PEER_LOST_MARKS = ("connection closed by peer", "connection reset by peer", "broken pipe")
# gloo messages that carry no file name (seen: a DDP buffer broadcast after a timeout)
_GLOO_PHRASES = ("caused pair closure", "timed out waiting")
# where a collective's error is raised when it comes through Python code
_COLLECTIVE_CODE = ("/torch/distributed/", "/torch/nn/parallel/distributed", "/deepspeed/comm/")


def describe_collective_failure(exc: BaseException, rank: int | None = None) -> str | None:
    """One line saying which phase's collective failed and what to do, or None when
    ``exc`` is not a collective timeout / lost peer (then it is a bug to show in full).

    gloo raises plain RuntimeErrors, mostly naming its source file
    (``.../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms for recv``),
    sometimes not (``Application timeout caused pair closure``, from a DDP broadcast);
    NCCL and the c10d store raise ``torch.distributed.DistError`` subclasses.
    """
    if not isinstance(exc, RuntimeError):  # DistError subclasses RuntimeError
        return None
    text = str(exc).lower()
    from_dist = (
        "gloo" in text
        or "nccl" in text
        or any(p in text for p in _GLOO_PHRASES)
        or _is_dist_error(exc)
        or _raised_in_collective_code(exc)
    )
    if not from_dist:
        return None
    rank = world_info().rank if rank is None else rank
    ph = getattr(exc, "jsm_phase", _phase)
    if any(m in text for m in _TIMEOUT_MARKS):
        return (
            f"rank {rank}: a collective of phase '{ph.name}' timed out after {ph.timeout_s:g} s "
            f"(another rank is stopped, hung or much slower); if this phase legitimately takes "
            f"longer, raise {ph.setting}"
        )
    if any(m in text for m in _PEER_LOST_MARKS):
        return (
            f"rank {rank}: a peer rank went away during a collective of phase '{ph.name}' "
            "(it crashed or was killed: see its own message)"
        )
    return None


def _raised_in_collective_code(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if any(part in tb.tb_frame.f_code.co_filename for part in _COLLECTIVE_CODE):
            return True
        tb = tb.tb_next
    return False


def _is_dist_error(exc: BaseException) -> bool:
    import torch.distributed as td

    error = getattr(td, "DistError", None)
    return error is not None and isinstance(exc, error)


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

    # NCCL reduces CUDA tensors only (gloo CPU ones): put the sums where the backend works
    on_gpu = td.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else None
    t = torch.tensor(values, dtype=torch.float64, device=device)
    td.all_reduce(t)
    return t.cpu().tolist()


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
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in TRUE_VALUES


def accelerator_kwargs(cuda_available: bool | None = None, env: Mapping[str, str] | None = None):
    """Keyword arguments for ``Accelerator(...)`` that match how the job was launched.

    * no CUDA, no DeepSpeed: ``cpu=True`` (else each torchrun worker silently trains alone);
    * no CUDA, DeepSpeed: a gloo process group (DeepSpeed on CPU) and no ``cpu=True``.
    """
    env = os.environ if env is None else env
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    deepspeed = env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in TRUE_VALUES
    if cuda_available:
        return {}
    if deepspeed:
        from accelerate.utils import InitProcessGroupKwargs

        return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}


def verify_world(accelerator, env: Mapping[str, str] | None = None) -> None:
    """Fail fast when accelerate's world differs from the launcher's (the silent-NO trap)."""
    env = os.environ if env is None else env
    want = int(env.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != want:
        raise RuntimeError(
            f"accelerate sees {accelerator.num_processes} process(es) but WORLD_SIZE={want}: on a "
            "machine without CUDA pass cpu=True (DDP) or a gloo InitProcessGroupKwargs (DeepSpeed)"
        )
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in TRUE_VALUES:
        kind = str(accelerator.distributed_type)
        if "DEEPSPEED" not in kind:
            raise RuntimeError(f"launched with DeepSpeed but accelerate runs {kind}")


def process_group_handlers(handlers: list, timeout_s: float) -> list:
    """``handlers`` with the process-group timeout set: on the launcher's own
    ``InitProcessGroupKwargs`` (DeepSpeed on CPU brings one for gloo), else on a new one.

    accelerate passes a handler's fields to ``init_process_group`` (DDP) or to DeepSpeed's
    ``init_distributed`` only when they differ from a default-constructed handler, whose
    timeout is 600 s: a 600 s setting would be dropped and gloo would wait its default
    30 min. The handler here always hands its timeout on.
    """
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    out = list(handlers)
    init = next((h for h in out if isinstance(h, InitProcessGroupKwargs)), None)
    if init is None:
        init = InitProcessGroupKwargs()
        out.append(init)
    init.timeout = timedelta(seconds=timeout_s)
    kwargs = {**init.to_kwargs(), "timeout": init.timeout}
    init.to_kwargs = lambda: dict(kwargs)  # the one call accelerate makes on this handler
    return out


def make_accelerator(
    *,
    force_cpu: bool = False,
    mixed_precision: str = "no",
    grad_accum: int = 1,
    find_unused_parameters: bool = True,
    timeout_s: float = DEFAULT_TIMEOUT_S,
):
    """The run's ``Accelerator``, set up for the hardware and the launcher at hand.

    CUDA: NCCL (DDP or DeepSpeed as launched). No CUDA: ``cpu=True`` for DDP over gloo, or
    a gloo process group for DeepSpeed (see :func:`accelerator_kwargs`). Fails, never
    hangs, when DeepSpeed is combined with CPU forcing or when the launcher's world size
    disagrees with the accelerator's (:func:`verify_world`). ``timeout_s``: how long a
    collective waits for the other ranks (checked on the process group once it exists).
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if using_deepspeed() and force_cpu:
        raise ValueError(
            "DeepSpeed cannot be combined with train.cpu=true / accelerate --cpu: "
            "launch without --use_deepspeed for CPU-only DDP, or drop --cpu"
        )
    kwargs = accelerator_kwargs(cuda_available=torch.cuda.is_available() and not force_cpu)
    if force_cpu and not using_deepspeed():
        kwargs = {"cpu": True}
    if kwargs.get("cpu") or not torch.cuda.is_available():
        mixed_precision = "no"  # fp16/bf16 autocast on CPU only slows these convolutions
    handlers = process_group_handlers(kwargs.pop("kwargs_handlers", []), timeout_s)
    handlers.append(DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters))
    set_phase("start-up", timeout_s=timeout_s)
    if using_deepspeed():
        from jsm_dist.ds_ops import load_cpu_comm_op

        load_cpu_comm_op()  # DeepSpeed's own load would wait forever on a dead build's lock
    acc = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        kwargs_handlers=handlers,
        **kwargs,
    )
    verify_world(acc)
    got = group_timeout_s()
    if got is not None and abs(got - timeout_s) > 1e-3:
        raise RuntimeError(
            f"the process group's collective timeout is {got:g} s, not the {timeout_s:g} s "
            "asked for (train.dist_timeout_s): accelerate did not pass it on"
        )
    return acc


def fault_point(name: str, value: int | None = None) -> None:
    """Fault injection for crash and hang tests: act on this process at a named point.

    ``JSM_FAULT=<name>[:<value>]`` (and optionally ``JSM_FAULT_RANK=<rank>``, default 0)
    acts on the matching rank when the run reaches ``fault_point(name, value)``; what it
    does is ``JSM_FAULT_ACTION``: ``kill`` (default: SIGKILL, a real, unclean death, no
    cleanup), ``stop`` (SIGSTOP: alive but frozen, as a hung peer is) or ``sleep:<s>``
    (a slow rank). Unset (always, outside tests) it does nothing.
    """
    spec = os.environ.get("JSM_FAULT")
    if not spec:
        return
    want, _, val = spec.partition(":")
    if want != name or (val and value is not None and int(val) != value):
        return
    if world_info().rank != int(os.environ.get("JSM_FAULT_RANK", "0")):
        return
    import logging
    import signal
    import sys
    import time

    action, _, arg = os.environ.get("JSM_FAULT_ACTION", "kill").partition(":")
    logging.getLogger(__name__).warning("fault point %s(%s): %s %s", name, value, action, arg)
    sys.stdout.flush()
    sys.stderr.flush()
    if action == "sleep":
        time.sleep(float(arg))
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        os.kill(os.getpid(), signal.SIGKILL)
