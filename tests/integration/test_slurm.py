"""The SLURM batch scripts against a real local Slurm (slurm-wlm 22.05, started and stopped here).

launch/slurm/local_slurm.sh brings up munged + slurmctld + slurmd (installing slurm-wlm with
apt-get when missing); the jobs run launch/slurm/train_*.sbatch, most with the training module
replaced by tests/integration/dist_probe.py (JSM_TRAIN_MODULE), which initialises accelerate,
all-reduces and writes what it saw; one runs the real entry point, jsm_dist.train, on a tiny
corpus. Two nodes are emulated on this host with two slurmd
processes (slurmd -N). Every subprocess has a timeout; the cluster is torn down even when a
test fails. Needs root (daemons); skipped, loudly, only when Slurm cannot be installed/run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import make_tiny_corpus

from jsm_dist.labels import LabelStore
from jsm_dist.models import load_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LOCAL_SLURM = REPO / "launch" / "slurm" / "local_slurm.sh"
PROBE = "tests/integration/dist_probe.py"
JOB_TIMEOUT_S = 240


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> int:
    """A base port such that base .. base+n-1 are free now."""
    for _ in range(200):
        base = random.randint(20000, 28000)
        if all(_port_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free port range")


class LocalSlurm:
    def __init__(self, root: Path, nodes: int) -> None:
        self.root = root
        self.out_dirs: dict[str, Path] = {}
        base = _free_ports(3)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ACCELERATE_"))},
            "LOCAL_SLURM_DIR": str(root / "slurm"),
            "LOCAL_SLURM_NODES": str(nodes),
            "LOCAL_SLURM_CTLD_PORT": str(base),
            "LOCAL_SLURM_SLURMD_PORT": str(base + 1),
            "SLURM_CONF": str(root / "slurm" / "slurm.conf"),
        }

    def script(self, verb: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(LOCAL_SLURM), verb],
            check=False,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def run(self, *cmd: str, timeout: float = 30) -> str:
        res = subprocess.run(
            cmd, check=False, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert res.returncode == 0, f"{cmd} -> {res.returncode}: {res.stderr}"
        return res.stdout

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def submit(
        self, sbatch: str, out_dir: Path, extra_env: dict, *args: str, module: str = PROBE
    ) -> str:
        """sbatch ``launch/slurm/<sbatch>`` running ``module`` (the probe unless given)."""
        env = {**self.env, "JSM_REPO_ROOT": str(REPO), "PROBE_OUT": str(out_dir), **extra_env}
        env["JSM_TRAIN_MODULE"] = module
        res = subprocess.run(
            [
                "sbatch",
                "--parsable",
                "--time=5",
                f"--output={out_dir}/slurm-%j.out",
                f"--chdir={REPO}",
                str(REPO / "launch" / "slurm" / sbatch),
                *args,
            ],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert res.returncode == 0, res.stderr
        job = res.stdout.strip().split(";")[0]
        self.out_dirs[job] = out_dir
        return job

    def wait(self, job_id: str, until, what: str, timeout: float = JOB_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if until(info):
                return info
            state = info.get("JobState", "")
            if state in {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}:
                pytest.fail(f"job {job_id} {state} waiting for {what}:\n{self.log(job_id)}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"job {job_id} not {what} after {timeout}s ({state}):\n{self.log(job_id)}"
                )
            time.sleep(1)

    def log(self, job_id: str) -> str:
        path = self.out_dirs[job_id] / f"slurm-{job_id}.out"
        return path.read_text()[-6000:] if path.exists() else f"(no {path})"


def _bring_up(root: Path, nodes: int) -> LocalSlurm:
    if os.geteuid() != 0:
        pytest.skip(
            "SLURM INTEGRATION NOT RUN: needs root to install slurm-wlm and start "
            "munged/slurmctld/slurmd"
        )
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip(
            "SLURM INTEGRATION NOT RUN: slurm-wlm is not installed and apt-get is unavailable"
        )
    cluster = LocalSlurm(root, nodes)
    res = cluster.script("up", timeout=900)
    if res.returncode == 2:  # local_slurm.sh: could not install slurm-wlm
        pytest.skip(f"SLURM INTEGRATION NOT RUN: slurm-wlm could not be installed:\n{res.stderr}")
    if res.returncode != 0:
        cluster.script("down", timeout=120)
        pytest.fail(f"local Slurm did not come up (rc {res.returncode}):\n{res.stderr}")
    return cluster


@pytest.fixture(scope="class")
def slurm_one_node(tmp_path_factory):
    cluster = _bring_up(tmp_path_factory.mktemp("slurm1"), nodes=1)
    try:
        yield cluster
    finally:
        cluster.script("down", timeout=120)


@pytest.fixture(scope="class")
def slurm_two_nodes(tmp_path_factory):
    cluster = _bring_up(tmp_path_factory.mktemp("slurm2"), nodes=2)
    try:
        yield cluster
    finally:
        cluster.script("down", timeout=120)


def _ranks(out_dir: Path, world: int) -> list[dict]:
    recs = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
    for r, rec in enumerate(recs):
        assert rec["rank"] == r and rec["world"] == world
        assert rec["sum"] == world * (world + 1) / 2  # all_reduce of rank+1 over the world
    return recs


def _done(info: dict) -> bool:
    return info.get("JobState") == "COMPLETED"


class TestOneNode:
    def test_single_node_sbatch_two_cpu_processes(self, slurm_one_node, tmp_path):
        cluster = slurm_one_node
        env = {"MODE": "cpu", "PROCS_PER_NODE": "2"}
        job = cluster.submit("train_single_node.sbatch", tmp_path, env, "--config", "c.yaml")
        cluster.wait(job, _done, "COMPLETED")
        recs = _ranks(tmp_path, 2)
        for rec in recs:
            assert rec["distributed_type"] == "DistributedType.MULTI_CPU"
            assert rec["argv"] == ["--resume", "latest", "--config", "c.yaml"]
            assert rec["slurm_job_id"] == job and rec["slurm_nodeid"] == "0"
            assert rec["master_port"] == str(29500 + int(job) % 10000)
        assert "[sbatch] srun exited 0" in cluster.log(job)

    def test_single_node_sbatch_runs_the_training_entry_point(self, slurm_one_node, tmp_path):
        """jsm_dist.train itself through sbatch -> srun -> accelerate launch (2 CPU processes):
        two steps on a tiny corpus, one refinement committed by both ranks, the model saved."""
        cluster = slurm_one_node
        corpus = make_tiny_corpus(tmp_path, shard_sizes=(5, 3, 4), size=32)
        run = tmp_path / "run"
        args = ["--corpus", str(corpus.root), "--out_dir", str(run), "--model.encoder", "tiny",
                "--model.pretrained", "false", "--model.crf", "false", "--data.train_size", "32",
                "--data.batch_size", "2", "--data.num_workers", "1", "--tensorboard", "false",
                "--image_grid_samples", "0", "--epochs", "1", "--tau", "1",
                "--train.max_steps_per_epoch", "2"]  # fmt: skip
        env = {"MODE": "cpu", "PROCS_PER_NODE": "2", "OMP_NUM_THREADS": "1"}
        job = cluster.submit(
            "train_single_node.sbatch", tmp_path, env, *args, module="jsm_dist.train"
        )
        cluster.wait(job, _done, "COMPLETED")
        assert "[sbatch] srun exited 0" in cluster.log(job)
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
        assert sorted(r["step"] for r in recs if r.get("kind") == "step") == [1, 2]
        refines = [r for r in recs if r.get("name") == "refine"]
        assert [(r["generation"], r["samples"]) for r in refines] == [(1, corpus.num_samples)]
        done = [r for r in recs if r.get("name") == "done"][-1]
        assert done["steps_per_rank"] == [2, 2] and done["refinements"] == 1
        store = LabelStore.open(run / "labels")
        assert store.generation == 1 and store.generations == [0, 1]
        assert store.manifest["generations"][-1]["world_size"] == 2  # both ranks took part
        for s in range(store.num_shards):  # every sample rewritten by generation 1, weighted
            side = store.read_side(s)
            assert (side[:, -1] == 1).all() and np.isfinite(side[:, :2]).all(), side
        changed = [not np.array_equal(store.memmap(s, 1), store.memmap(s, 0)) for s in range(3)]
        assert all(changed), f"generation 1 equals generation 0 in shards: {changed}"
        model = load_model(run / "model.pt")
        assert model.cfg.encoder == "tiny" and model.vocab == corpus.vocab

    def test_requeue_on_pre_timeout_signal_resumes(self, slurm_one_node, tmp_path):
        """USR1 (what --signal=B:USR1@90 sends) -> the script requeues -> restart 1 resumes."""
        cluster = slurm_one_node
        env = {"MODE": "cpu", "PROCS_PER_NODE": "2", "PROBE_HOLD_S": "200"}
        job = cluster.submit("train_single_node.sbatch", tmp_path, env)
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not all((tmp_path / f"started{r}").exists() for r in range(2)):
            assert time.monotonic() < deadline, f"probe never started:\n{cluster.log(job)}"
            assert cluster.job(job).get("JobState") in {"PENDING", "RUNNING", "CONFIGURING"}
            time.sleep(1)
        cluster.run("scancel", "--signal=USR1", "--batch", job)
        info = cluster.wait(
            job,
            lambda i: (
                i.get("Restarts") == "1"
                and i["JobState"] not in {"COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}
            ),
            "requeued",
        )
        if info["JobState"] == "PENDING":
            # Slurm holds a requeued batch job for ~2 minutes (BeginTime); skip that wait here.
            res = subprocess.run(
                ["scontrol", "update", f"JobId={job}", "StartTime=now"],
                check=False,
                env=cluster.env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            logging.getLogger(__name__).info("StartTime=now: %s %s", res.returncode, res.stderr)
        t_requeued = time.monotonic()
        cluster.wait(job, _done, "COMPLETED after requeue")
        logging.getLogger(__name__).info("restart ran %.1fs", time.monotonic() - t_requeued)
        for rec in _ranks(tmp_path, 2):
            assert rec["slurm_restart_count"] == 1
            assert rec["argv"][:2] == ["--resume", "latest"]
        log = cluster.log(job)
        assert "requeueing job" in log and "restart 1" in log


class TestTwoNodes:
    def test_multi_node_sbatch_one_process_per_node(self, slurm_two_nodes, tmp_path):
        cluster = slurm_two_nodes
        env = {"MODE": "cpu", "PROCS_PER_NODE": "1", "PROBE_STEP": "1"}
        job = cluster.submit("train_multi_node.sbatch", tmp_path, env, "--config", "c.yaml")
        cluster.wait(job, _done, "COMPLETED")
        recs = _ranks(tmp_path, 2)
        assert [r["slurm_nodeid"] for r in recs] == ["0", "1"]  # machine_rank = SLURM_NODEID
        assert [r["local_rank"] for r in recs] == [0, 0]
        # emulated node names do not resolve: the launcher used node 0's NodeAddr
        assert {r["master_addr"] for r in recs} == {"127.0.0.1"}
        assert all(r["step_loss"] is not None for r in recs)
        log = cluster.log(job)
        assert "--num_machines 2" in log and "--machine_rank 1" in log

    def test_multi_node_sbatch_deepspeed(self, slurm_two_nodes, tmp_path):
        """ZeRO-2 on CPU across two Slurm nodes (torchrun per node, no ssh/pdsh)."""
        cluster = slurm_two_nodes
        env = {"MODE": "deepspeed", "PROCS_PER_NODE": "1", "PROBE_STEP": "1"}
        job = cluster.submit("train_multi_node.sbatch", tmp_path, env)
        cluster.wait(job, _done, "COMPLETED")
        recs = _ranks(tmp_path, 2)
        assert {r["distributed_type"] for r in recs} == {"DistributedType.DEEPSPEED"}
        assert all(r["step_loss"] is not None for r in recs)
        assert "--deepspeed_multinode_launcher standard" in cluster.log(job)


def test_multi_node_yaml_two_local_machines(tmp_path):
    """launch/accelerate_multi_node.yaml with two `accelerate launch`es on this host (gloo)."""
    port = _free_ports(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ACCELERATE_"))}
    env.update(ACCELERATE_USE_CPU="1", PROBE_OUT=str(tmp_path), PYTHONUNBUFFERED="1")
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    procs, logs = [], []
    try:
        for rank in range(2):
            cmd = [
                accelerate,
                "launch",
                "--config_file",
                str(REPO / "launch" / "accelerate_multi_node.yaml"),
                "--num_machines",
                "2",
                "--num_processes",
                "2",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                str(port),
                "--mixed_precision",
                "no",
                PROBE,
            ]
            log = open(tmp_path / f"machine{rank}.log", "w")  # noqa: SIM115 (child's stdout)
            logs.append(log)
            procs.append(
                subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
        codes = [p.wait(timeout=JOB_TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        for log in logs:
            log.close()
    text = "".join((tmp_path / f"machine{r}.log").read_text()[-3000:] for r in range(2))
    assert codes == [0, 0], text
    recs = _ranks(tmp_path, 2)
    assert all(r["distributed_type"] == "DistributedType.MULTI_CPU" for r in recs)
