"""SLURM helpers for :mod:`jsm_dist.launching.cli`: this node's launch settings from ``SLURM_*``.

Holds the node-list expansion (``scontrol show hostnames``, with a pure-Python fallback),
the rendezvous address of machine 0 (its host name, else Slurm's NodeAddr), the GPU count
and rendezvous port SLURM implies, and ``from_slurm``, which builds the ``LaunchConfig`` of
this node of a job that runs one srun task per node.
"""

from __future__ import annotations

import logging
import re
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence

from jsm_dist.launching.command import DEFAULT_PORT, LaunchConfig, LaunchError

logger = logging.getLogger(__name__)

SCONTROL_TIMEOUT_S = 30.0


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
