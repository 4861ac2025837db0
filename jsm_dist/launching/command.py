"""The ``accelerate launch`` command line of one node, for :mod:`jsm_dist.launching.cli`.

Holds the launch settings (``LaunchConfig``, validated in ``__post_init__``, and
``LaunchError``), ``build_command`` / ``build_env``, which turn them into the argv and
environment of ``accelerate launch`` for the modes cpu, gpu and deepspeed (see the
launcher's module docstring for what each mode needs), and ``local_launch``, the
single-node command on a free port that the benchmarks and integration tests start.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from jsm_dist.dist import TRUE_VALUES

MODES = ("cpu", "gpu", "deepspeed")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
DEFAULT_PORT = 29500


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
    procs: int,
    train_args: Sequence[str],
    *,
    mode: str = "cpu",
    deepspeed_config_file: str = "",
    mixed_precision: str = "no",
) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of a single-node ``accelerate launch -m jsm_dist.train`` on a free port.

    Used by the benchmarks and the integration tests; ``accelerate`` runs through the
    current interpreter so that no PATH lookup is needed. ``mixed_precision`` is the
    launcher's (it should match the run's ``train.mixed_precision``).
    """
    cfg = LaunchConfig(
        mode=mode,
        procs_per_node=procs,
        mixed_precision=mixed_precision,
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
    return env.get("ACCELERATE_USE_CPU", "").strip().lower() in TRUE_VALUES
