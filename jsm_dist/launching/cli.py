"""Build and validate the ``accelerate launch`` command line for one node.

``launch/train.sh`` and the SLURM batch scripts call ``python -m jsm_dist.launching.cli``, which
turns a few knobs (mode, processes per node, machines, rendezvous) into one ``accelerate
launch`` command and ``exec``s it, so signals from srun/scancel reach accelerate directly.
Keeping this in Python makes every command line unit-testable from a fake ``SLURM_*`` env.
The command is built in :mod:`jsm_dist.launching.command`, the ``SLURM_*`` side is read in
:mod:`jsm_dist.launching.slurm`; this module holds the CLI. The training side's checks
(``dist.accelerator_kwargs``, ``dist.verify_world``) live with the accelerator set-up.

Modes (what each one needs, verified on CPU-only machines; see docs/platform.md):

* ``cpu``: DDP over gloo. ``accelerate launch --multi_gpu`` (torchrun underneath) plus the
  environment variable ``ACCELERATE_USE_CPU=1``; ``--cpu --num_processes 2`` would start one
  process only, and an accelerate yaml's ``use_cpu: true`` does not reach the workers on the
  ``--multi_gpu`` path, so the variable is set here.
* ``gpu``: DDP over NCCL, one process per GPU.
* ``deepspeed``: ``--use_deepspeed --deepspeed_config_file ds_config.json``; several machines
  use ``--deepspeed_multinode_launcher standard`` (torchrun per node, as srun starts one
  launcher per node; the default would ssh/pdsh into the other nodes). Runs on CPU hosts too
  (DeepSpeed picks its CPU accelerator) provided the training code passes
  ``InitProcessGroupKwargs(backend="gloo")``; see ``dist.accelerator_kwargs``. DeepSpeed
  combined with ``--cpu`` / ``ACCELERATE_USE_CPU`` is rejected here: accelerate either refuses
  it or, with the variable, silently drops DeepSpeed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Mapping, Sequence

from jsm_dist.launching.command import (
    DEFAULT_PORT,
    MIXED_PRECISIONS,
    MODES,
    LaunchConfig,
    LaunchError,
    build_command,
    build_env,
    env_forces_cpu,
)
from jsm_dist.launching.slurm import (
    from_slurm,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jsm_dist.launching.cli",
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
    if cfg.train_target == "jsm_dist.train":
        # bad settings end here in one line, not in one traceback per rank plus torchrun's
        from jsm_dist.train import check_settings

        if check_settings(list(cfg.train_args), world_size=cfg.num_processes) is None:
            return 2
    logger.info("node %d/%d: %s", cfg.machine_rank, cfg.num_machines, line)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, build_env(cfg))  # replaces this process: signals reach accelerate
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
