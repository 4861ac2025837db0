"""Build and validate the ``accelerate launch`` command line for one node.

``launch/train.sh`` and the SLURM batch scripts call ``python -m jsm_dist.launcher``, which
turns a few knobs (mode, processes per node, machines, rendezvous) into one ``accelerate
launch`` command and ``exec``s it, so signals from srun/scancel reach accelerate directly.
Keeping this in Python makes every command line unit-testable from a fake ``SLURM_*`` env.

Modes (what each one needs, verified on CPU-only machines; see PLATFORM_NOTES.md):

* ``cpu``: DDP over gloo. ``accelerate launch --multi_gpu`` (torchrun underneath) plus the
  environment variable ``ACCELERATE_USE_CPU=1``; ``--cpu --num_processes 2`` would start one
  process only, and an accelerate yaml's ``use_cpu: true`` does not reach the workers on the
  ``--multi_gpu`` path, so the variable is set here.
* ``gpu``: DDP over NCCL, one process per GPU.
* ``deepspeed``: ``--use_deepspeed --deepspeed_config_file ds_config.json``; several machines
  use ``--deepspeed_multinode_launcher standard`` (torchrun per node, as srun starts one
  launcher per node; the default would ssh/pdsh into the other nodes). Runs on CPU hosts too
  (DeepSpeed picks its CPU accelerator) provided the training code passes
  ``InitProcessGroupKwargs(backend="gloo")``; see :func:`accelerator_kwargs`. DeepSpeed
  combined with ``--cpu`` / ``ACCELERATE_USE_CPU`` is rejected here: accelerate either refuses
  it or, with the variable, silently drops DeepSpeed.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

MODES = ("cpu", "gpu", "deepspeed")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
DEFAULT_PORT = 29500
SCONTROL_TIMEOUT_S = 30.0
_TRUE = {"1", "true", "yes", "on"}


class LaunchError(ValueError):
    """A launch setting that cannot work; raised before any process starts."""


@dataclass
class LaunchConfig:
    """What one node's ``accelerate launch`` needs.

    Attributes:
        mode: "cpu" (DDP over gloo), "gpu" (DDP over NCCL) or "deepspeed" (ZeRO per ds_config).
        procs_per_node: training processes on this node (GPUs per node on GPU machines).
        num_machines: nodes in the job.
        machine_rank: this node's index in [0, num_machines).
        main_process_ip: address of machine 0 (the rendezvous host); needed if num_machines > 1.
        main_process_port: TCP port of the rendezvous on machine 0.
        mixed_precision: "no", "fp16" or "bf16".
        deepspeed_config_file: ZeRO JSON, used in mode "deepspeed".
        config_file: optional accelerate yaml; the flags built here override its values.
        train_target: python module to run (``-m``), or a path ending in ".py".
        train_args: arguments passed through to the training module.
        force_cpu: the caller asked for CPU explicitly (``--cpu`` or ACCELERATE_USE_CPU set).
        accelerate_bin: the ``accelerate`` executable.
    """

    mode: str = "cpu"
    procs_per_node: int = 2
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int = DEFAULT_PORT
    mixed_precision: str = "no"
    deepspeed_config_file: str = "ds_config.json"
    config_file: str | None = None
    train_target: str = "jsm_dist.train"
    train_args: tuple[str, ...] = field(default_factory=tuple)
    force_cpu: bool = False
    accelerate_bin: str = "accelerate"

    def __post_init__(self) -> None:
        self.train_args = tuple(self.train_args)
        if self.mode not in MODES:
            raise LaunchError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "deepspeed" and self.force_cpu:
            raise LaunchError(
                "DeepSpeed cannot be combined with --cpu / ACCELERATE_USE_CPU=1: accelerate "
                "refuses '--use_deepspeed --cpu' and with ACCELERATE_USE_CPU=1 it silently runs "
                "without DeepSpeed. To run DeepSpeed on a CPU-only host, drop the CPU flag "
                "(DeepSpeed picks its CPU accelerator itself; the training code passes "
                "InitProcessGroupKwargs(backend='gloo')), or use mode 'cpu' for plain DDP."
            )
        if self.mode == "gpu" and self.force_cpu:
            raise LaunchError("mode 'gpu' was combined with a CPU flag; use mode 'cpu' for CPU DDP")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise LaunchError(
                f"mixed_precision must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}"
            )
        if self.mode == "cpu" and self.mixed_precision == "fp16":
            raise LaunchError(
                "mixed_precision 'fp16' needs a GPU; use 'no' or 'bf16' in mode 'cpu'"
            )
        if self.procs_per_node < 1:
            raise LaunchError(f"procs_per_node must be >= 1, got {self.procs_per_node}")
        if self.num_machines < 1:
            raise LaunchError(f"num_machines must be >= 1, got {self.num_machines}")
        if not 0 <= self.machine_rank < self.num_machines:
            raise LaunchError(
                f"machine_rank must be in [0, {self.num_machines}), got {self.machine_rank}"
            )
        if self.num_machines > 1 and not self.main_process_ip:
            raise LaunchError(f"main_process_ip is required with num_machines={self.num_machines}")
        if not 1 <= self.main_process_port <= 65535:
            raise LaunchError(
                f"main_process_port must be in [1, 65535], got {self.main_process_port}"
            )
        if not self.train_target:
            raise LaunchError("train_target (module or .py path) must not be empty")

    @property
    def num_processes(self) -> int:
        """Processes in the whole job (accelerate's --num_processes is the total)."""
        return self.num_machines * self.procs_per_node


def build_command(cfg: LaunchConfig) -> list[str]:
    """The ``accelerate launch`` argv for this node (no shell quoting needed)."""
    cmd = [cfg.accelerate_bin, "launch"]
    if cfg.config_file:
        cmd += ["--config_file", cfg.config_file]
    if cfg.mode == "deepspeed":
        cmd += ["--use_deepspeed", "--deepspeed_config_file", cfg.deepspeed_config_file]
        if cfg.num_machines > 1:
            cmd += ["--deepspeed_multinode_launcher", "standard"]
    elif cfg.num_processes > 1:
        # torchrun underneath; on CPU the env var ACCELERATE_USE_CPU=1 (build_env) makes the
        # workers use gloo instead of silently falling back to DistributedType.NO.
        cmd += ["--multi_gpu"]
    elif cfg.mode == "cpu":
        cmd += ["--cpu"]  # one process: the simple launcher, which honours --cpu
    cmd += [
        "--num_processes",
        str(cfg.num_processes),
        "--num_machines",
        str(cfg.num_machines),
        "--mixed_precision",
        cfg.mixed_precision,
        "--dynamo_backend",
        "no",
    ]
    if cfg.num_processes > 1 or cfg.num_machines > 1:
        cmd += ["--main_process_port", str(cfg.main_process_port)]
    if cfg.num_machines > 1:
        cmd += [
            "--machine_rank",
            str(cfg.machine_rank),
            "--main_process_ip",
            str(cfg.main_process_ip),
            "--same_network",
            "--rdzv_backend",
            "static",
        ]
    if cfg.train_target.endswith(".py"):
        cmd.append(cfg.train_target)
    else:
        cmd += ["-m", cfg.train_target]
    cmd += list(cfg.train_args)
    return cmd


def build_env(cfg: LaunchConfig, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for the launch: ``base`` plus what the mode needs."""
    env = dict(os.environ if base is None else base)
    if cfg.mode == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"
    return env


def free_port() -> int:
    """A TCP port free on this host right now (for single-node rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_launch(
    procs: int, train_args: Sequence[str], *, mode: str = "cpu", deepspeed_config_file: str = ""
) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of a single-node ``accelerate launch -m jsm_dist.train`` on a free port.

    Used by the benchmarks and the integration tests; ``accelerate`` runs through the
    current interpreter so that no PATH lookup is needed.
    """
    cfg = LaunchConfig(
        mode=mode,
        procs_per_node=procs,
        main_process_port=free_port(),
        deepspeed_config_file=deepspeed_config_file or "ds_config.json",
        train_args=tuple(train_args),
    )
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *build_command(cfg)[2:]]
    env = build_env(cfg)
    if mode != "cpu":
        env.pop("ACCELERATE_USE_CPU", None)
    env["PYTHONUNBUFFERED"] = "1"
    return cmd, env


def env_forces_cpu(env: Mapping[str, str]) -> bool:
    """True when ACCELERATE_USE_CPU is set to a true value."""
    return env.get("ACCELERATE_USE_CPU", "").strip().lower() in _TRUE


# ----------------------------------------------------------------------------- SLURM


def _split_top_level(nodelist: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in nodelist:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise LaunchError(f"unbalanced brackets in SLURM node list {nodelist!r}")
    parts.append("".join(cur))
    return [p for p in parts if p]


def _expand_one(name: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", name)
    if m is None:
        return [name]
    head, tail = name[: m.start()], name[m.end() :]
    out = []
    for item in m.group(1).split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise LaunchError(f"cannot parse range {item!r} in SLURM node list entry {name!r}")
        width = len(lo)
        for i in range(int(lo), int(hi if sep else lo) + 1):
            out += [head + str(i).zfill(width) + rest for rest in _expand_one(tail)]
    return out


def expand_hostlist(nodelist: str) -> list[str]:
    """Pure-Python ``scontrol show hostnames``: "gpu[01-02,07],cpu5" -> gpu01 gpu02 gpu07 cpu5."""
    return [host for part in _split_top_level(nodelist.strip()) for host in _expand_one(part)]


def _run_scontrol(args: Sequence[str]) -> str | None:
    try:
        res = subprocess.run(
            ["scontrol", *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=SCONTROL_TIMEOUT_S,
        )
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        logger.warning("scontrol %s failed: %s", " ".join(args), exc)
        return None
    if res.returncode != 0:
        logger.warning("scontrol %s exited %d: %s", " ".join(args), res.returncode, res.stderr)
        return None
    return res.stdout


def slurm_hostnames(nodelist: str) -> list[str]:
    """Hosts of a SLURM node list: ``scontrol show hostnames``, else the pure-Python expander."""
    out = _run_scontrol(["show", "hostnames", nodelist])
    hosts = out.split() if out else []
    return hosts or expand_hostlist(nodelist)


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
    except OSError:
        return False
    return True


def slurm_node_addr(host: str) -> str | None:
    """The NodeAddr Slurm itself uses for ``host`` (``scontrol show node -o``), if any."""
    out = _run_scontrol(["show", "node", "-o", host])
    m = re.search(r"\bNodeAddr=(\S+)", out or "")
    return m.group(1) if m else None


def rendezvous_address(
    host: str,
    resolves: Callable[[str], bool] = _resolves,
    node_addr: Callable[[str], str | None] = slurm_node_addr,
) -> str:
    """Address of machine 0: its host name when that resolves, else its Slurm NodeAddr.

    Node names resolve on ordinary clusters; where they do not (emulated nodes, clusters
    whose DNS only knows interface names) Slurm's NodeAddr is what its daemons use too.
    """
    if resolves(host):
        return host
    addr = node_addr(host)
    if addr:
        logger.info("node %s does not resolve; using its NodeAddr %s", host, addr)
        return addr
    raise LaunchError(f"main node {host!r} does not resolve and Slurm reports no NodeAddr for it")


def _int_env(env: Mapping[str, str], *names: str) -> int:
    for name in names:
        if env.get(name, "").strip():
            try:
                return int(env[name])
            except ValueError:
                raise LaunchError(f"{name}={env[name]!r} is not an integer") from None
    raise LaunchError(f"{' or '.join(names)} not set: not inside a SLURM job step?")


def gpus_on_node(env: Mapping[str, str]) -> int | None:
    """GPUs SLURM gave this node: SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE ("a100:4")."""
    if env.get("SLURM_GPUS_ON_NODE", "").strip().isdigit():
        return int(env["SLURM_GPUS_ON_NODE"])
    per_node = env.get("SLURM_GPUS_PER_NODE", "").strip()
    m = re.search(r"(\d+)(\(|$)", per_node)
    return int(m.group(1)) if m else None


def default_port(env: Mapping[str, str]) -> int:
    """29500 + job id mod 10000: jobs sharing a node do not collide on the rendezvous port."""
    job = env.get("SLURM_JOB_ID", "").strip()
    return DEFAULT_PORT + int(job) % 10000 if job.isdigit() else DEFAULT_PORT


def from_slurm(
    env: Mapping[str, str],
    *,
    mode: str,
    procs_per_node: int | None = None,
    port: int | None = None,
    hostnames: Callable[[str], list[str]] = slurm_hostnames,
    address: Callable[[str], str] = rendezvous_address,
    **overrides,
) -> LaunchConfig:
    """LaunchConfig for this node of a SLURM job (one srun task per node).

    machine_rank = SLURM_NODEID, num_machines = SLURM_NNODES, main_process_ip = the first of
    ``scontrol show hostnames $SLURM_JOB_NODELIST``, num_processes = nodes * procs_per_node
    (procs_per_node from the argument, else the GPUs SLURM allotted per node).
    """
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("SLURM_JOB_NODELIST not set: not inside a SLURM job?")
    num_machines = _int_env(env, "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    machine_rank = _int_env(env, "SLURM_NODEID")
    if procs_per_node is None:
        procs_per_node = gpus_on_node(env) if mode != "cpu" else None
        if procs_per_node is None:
            raise LaunchError(
                f"processes per node unknown in mode {mode!r}: pass --procs-per-node "
                "(or request GPUs with --gpus-per-node)"
            )
    hosts = hostnames(nodelist)
    if len(hosts) != num_machines:
        raise LaunchError(
            f"node list {nodelist!r} names {len(hosts)} hosts but SLURM_NNODES={num_machines}"
        )
    main_ip = address(hosts[0]) if num_machines > 1 else overrides.pop("main_process_ip", None)
    return LaunchConfig(
        mode=mode,
        procs_per_node=procs_per_node,
        num_machines=num_machines,
        machine_rank=machine_rank,
        main_process_ip=main_ip,
        main_process_port=default_port(env) if port is None else port,
        **overrides,
    )


# ----------------------------------------------------------------------- training side


def accelerator_kwargs(cuda_available: bool | None = None, env: Mapping[str, str] | None = None):
    """Keyword arguments for ``Accelerator(...)`` that match how the job was launched.

    * no CUDA, no DeepSpeed: ``cpu=True`` (else each torchrun worker silently trains alone);
    * no CUDA, DeepSpeed: a gloo process group (DeepSpeed on CPU) and no ``cpu=True``.
    """
    env = os.environ if env is None else env
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    deepspeed = env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in _TRUE
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
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in _TRUE:
        kind = str(accelerator.distributed_type)
        if "DEEPSPEED" not in kind:
            raise RuntimeError(f"launched with DeepSpeed but accelerate runs {kind}")


# ---------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jsm_dist.launcher",
        description="Build (and exec) the `accelerate launch` command for this node. "
        "Arguments after `--` go to the training module.",
    )
    p.add_argument("--mode", choices=MODES, default="cpu", help="cpu DDP, gpu DDP, or DeepSpeed")
    p.add_argument("--procs-per-node", type=int, default=None, help="processes on each node")
    p.add_argument("--num-machines", type=int, default=1, help="nodes (ignored with --from-slurm)")
    p.add_argument(
        "--machine-rank", type=int, default=0, help="this node's rank (ignored w/ slurm)"
    )
    p.add_argument("--main-process-ip", default=None, help="machine 0's address (multi-node)")
    p.add_argument("--port", type=int, default=None, help="rendezvous port (default 29500(+job))")
    p.add_argument(
        "--from-slurm",
        action="store_true",
        help="take nodes, node rank and main address from SLURM_* (one srun task per node)",
    )
    p.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, default="no", help="AMP mode")
    p.add_argument("--deepspeed-config", default="ds_config.json", help="ZeRO JSON (deepspeed)")
    p.add_argument("--config-file", default=None, help="accelerate yaml (flags here override)")
    p.add_argument(
        "--train-module",
        default="jsm_dist.train",
        help="module run with -m, or a script path ending in .py",
    )
    p.add_argument("--cpu", action="store_true", help="force CPU (an error with deepspeed)")
    p.add_argument(
        "--accelerate",
        default=None,
        help="the accelerate executable (default: the one beside this python, else PATH)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then training arguments")
    return p


def _default_accelerate() -> str:
    # srun does not always carry the venv's bin/ on PATH: prefer the launcher's own venv.
    beside = os.path.join(os.path.dirname(sys.executable), "accelerate")
    return beside if os.access(beside, os.X_OK) else "accelerate"


def config_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> LaunchConfig:
    """LaunchConfig from parsed CLI arguments and the environment."""
    train_args = list(args.train_args)
    if train_args[:1] == ["--"]:
        train_args = train_args[1:]
    common = {
        "mixed_precision": args.mixed_precision,
        "deepspeed_config_file": args.deepspeed_config,
        "config_file": args.config_file,
        "train_target": args.train_module,
        "train_args": tuple(train_args),
        "force_cpu": args.cpu or (args.mode != "cpu" and env_forces_cpu(env)),
        "accelerate_bin": args.accelerate or _default_accelerate(),
    }
    if args.from_slurm:
        return from_slurm(
            env, mode=args.mode, procs_per_node=args.procs_per_node, port=args.port, **common
        )
    return LaunchConfig(
        mode=args.mode,
        procs_per_node=2 if args.procs_per_node is None else args.procs_per_node,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        main_process_ip=args.main_process_ip,
        main_process_port=DEFAULT_PORT if args.port is None else args.port,
        **common,
    )


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[launcher] %(message)s")
    args = _parser().parse_args(argv)
    try:
        cfg = config_from_args(args, os.environ)
    except LaunchError as exc:
        logger.error("%s", exc)
        return 2
    cmd = build_command(cfg)
    line = shlex.join(cmd)
    if args.dry_run:
        print(("ACCELERATE_USE_CPU=1 " if cfg.mode == "cpu" else "") + line)
        return 0
    logger.info("node %d/%d: %s", cfg.machine_rank, cfg.num_machines, line)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, build_env(cfg))  # replaces this process: signals reach accelerate
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
