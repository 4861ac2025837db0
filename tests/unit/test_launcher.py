"""jsm_dist.launching.cli: accelerate command lines from fake SLURM env, validation, configs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from jsm_dist import dist
from jsm_dist.launching import cli as L
from jsm_dist.launching import command as C
from jsm_dist.launching import slurm as S

REPO = Path(__file__).resolve().parents[2]


def flag(cmd: list[str], name: str) -> str:
    """Value that follows ``name`` in an argv (exactly once)."""
    assert cmd.count(name) == 1, f"{name} appears {cmd.count(name)} times in {cmd}"
    return cmd[cmd.index(name) + 1]


def slurm_env(nodelist: str, nnodes: int, nodeid: int, job: int = 4711, **extra) -> dict:
    env = {
        "SLURM_JOB_ID": str(job),
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_NNODES": str(nnodes),
        "SLURM_NODEID": str(nodeid),
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def fake_slurm(env, **kw) -> C.LaunchConfig:
    """from_slurm with scontrol replaced by the pure-Python expander and no DNS."""
    return S.from_slurm(env, hostnames=S.expand_hostlist, address=lambda host: host, **kw)


def test_one_node_cpu_from_slurm():
    env = slurm_env("cn17", 1, 0, job=123456)
    cfg = fake_slurm(env, mode="cpu", procs_per_node=2, train_args=("--config", "c.yaml"))
    cmd = C.build_command(cfg)
    assert cmd[:2] == ["accelerate", "launch"]
    assert "--multi_gpu" in cmd and "--use_deepspeed" not in cmd and "--cpu" not in cmd
    assert flag(cmd, "--num_processes") == "2"
    assert flag(cmd, "--num_machines") == "1"
    assert flag(cmd, "--main_process_port") == str(C.DEFAULT_PORT + 123456 % 10000)
    assert "--machine_rank" not in cmd and "--main_process_ip" not in cmd
    assert cmd[-4:] == ["-m", "jsm_dist.train", "--config", "c.yaml"]
    assert C.build_env(cfg, base={})["ACCELERATE_USE_CPU"] == "1"


def test_three_nodes_gpu_from_slurm():
    env = slurm_env("gpu[07-09]", 3, 2, SLURM_GPUS_ON_NODE=4)
    cfg = fake_slurm(env, mode="gpu", port=31000)
    cmd = C.build_command(cfg)
    assert cfg.procs_per_node == 4
    assert flag(cmd, "--num_processes") == "12"  # nodes x GPUs per node
    assert flag(cmd, "--num_machines") == "3"
    assert flag(cmd, "--machine_rank") == "2"  # SLURM_NODEID
    assert flag(cmd, "--main_process_ip") == "gpu07"  # first host of the node list
    assert flag(cmd, "--main_process_port") == "31000"
    assert "--multi_gpu" in cmd and "--same_network" in cmd
    assert flag(cmd, "--rdzv_backend") == "static"
    assert "ACCELERATE_USE_CPU" not in C.build_env(cfg, base={})


def test_three_nodes_deepspeed_uses_standard_multinode_launcher():
    env = slurm_env("a[1-2],b5", 3, 0, SLURM_GPUS_PER_NODE="h100:8")
    cfg = fake_slurm(env, mode="deepspeed", deepspeed_config_file="ds_config.json")
    cmd = C.build_command(cfg)
    assert flag(cmd, "--num_processes") == "24"
    assert flag(cmd, "--machine_rank") == "0"
    assert flag(cmd, "--main_process_ip") == "a1"
    assert flag(cmd, "--deepspeed_config_file") == "ds_config.json"
    assert flag(cmd, "--deepspeed_multinode_launcher") == "standard"
    assert "--multi_gpu" not in cmd


def test_single_process_cpu_uses_cpu_flag_not_multi_gpu():
    cmd = C.build_command(C.LaunchConfig(mode="cpu", procs_per_node=1))
    assert "--cpu" in cmd and "--multi_gpu" not in cmd
    assert "--main_process_port" not in cmd


def test_script_path_runs_without_dash_m():
    cfg = C.LaunchConfig(train_target="tests/integration/dist_probe.py", train_args=("--x", "1"))
    assert C.build_command(cfg)[-3:] == ["tests/integration/dist_probe.py", "--x", "1"]


def test_deepspeed_with_cpu_is_rejected():
    with pytest.raises(C.LaunchError, match="DeepSpeed cannot be combined with --cpu"):
        C.LaunchConfig(mode="deepspeed", force_cpu=True)


def test_cli_rejects_deepspeed_with_cpu_env(monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    assert L.main(["--mode", "deepspeed", "--dry-run"]) == 2
    assert "DeepSpeed cannot be combined" in caplog.text
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert L.main(["--mode", "deepspeed", "--cpu", "--dry-run"]) == 2


def test_cli_dry_run_prints_command(capsys, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    rc = L.main(["--mode", "deepspeed", "--procs-per-node", "2", "--dry-run", "--", "--lr", "3"])
    out = capsys.readouterr().out.split()
    assert rc == 0
    assert flag(out, "--num_processes") == "2" and "--use_deepspeed" in out
    assert out[-4:] == ["-m", "jsm_dist.train", "--lr", "3"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "tpu"}, "mode must be one of"),
        ({"procs_per_node": 0}, "procs_per_node must be >= 1, got 0"),
        ({"num_machines": 2, "machine_rank": 2, "main_process_ip": "h"}, "got 2"),
        ({"num_machines": 2}, "main_process_ip is required"),
        ({"main_process_port": 70000}, "got 70000"),
        ({"mode": "cpu", "mixed_precision": "fp16"}, "needs a GPU"),
        ({"mixed_precision": "fp8"}, "'fp8'"),
    ],
)
def test_invalid_settings_fail_with_the_value(kwargs, message):
    with pytest.raises(C.LaunchError, match=message):
        C.LaunchConfig(**kwargs)


def test_missing_slurm_variables_are_named():
    with pytest.raises(C.LaunchError, match="SLURM_JOB_NODELIST"):
        fake_slurm({}, mode="cpu", procs_per_node=1)
    with pytest.raises(C.LaunchError, match="SLURM_NODEID"):
        fake_slurm({"SLURM_JOB_NODELIST": "a", "SLURM_NNODES": "1"}, mode="cpu", procs_per_node=1)
    with pytest.raises(C.LaunchError, match="processes per node unknown"):
        fake_slurm(slurm_env("a[1-2]", 2, 0), mode="gpu")
    with pytest.raises(C.LaunchError, match="names 2 hosts but SLURM_NNODES=3"):
        fake_slurm(slurm_env("a[1-2]", 3, 0), mode="cpu", procs_per_node=1)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("cn17", ["cn17"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("a[1-2],b5,c[9-10]-ib", ["a1", "a2", "b5", "c9-ib", "c10-ib"]),
        ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
    ],
)
def test_expand_hostlist(nodelist, hosts):
    assert S.expand_hostlist(nodelist) == hosts


def test_expand_hostlist_rejects_garbage():
    with pytest.raises(C.LaunchError, match="unbalanced"):
        S.expand_hostlist("a[1-2")
    with pytest.raises(C.LaunchError, match="cannot parse range"):
        S.expand_hostlist("a[x-2]")


@pytest.mark.parametrize(
    "env, gpus",
    [
        ({"SLURM_GPUS_ON_NODE": "4"}, 4),
        ({"SLURM_GPUS_PER_NODE": "8"}, 8),
        ({"SLURM_GPUS_PER_NODE": "a100:2"}, 2),
        ({"SLURM_GPUS_PER_NODE": "gpu:h100:4(IDX:0-3)"}, 4),
        ({}, None),
    ],
)
def test_gpus_on_node(env, gpus):
    assert S.gpus_on_node(env) == gpus


def test_rendezvous_address_falls_back_to_node_addr():
    assert S.rendezvous_address("n1", resolves=lambda h: True, node_addr=lambda h: "x") == "n1"
    got = S.rendezvous_address("n1", resolves=lambda h: False, node_addr=lambda h: "10.1.2.3")
    assert got == "10.1.2.3"
    with pytest.raises(C.LaunchError, match="does not resolve"):
        S.rendezvous_address("n1", resolves=lambda h: False, node_addr=lambda h: None)


def test_accelerator_kwargs_match_the_launch():
    assert dist.accelerator_kwargs(cuda_available=False, env={}) == {"cpu": True}
    assert dist.accelerator_kwargs(cuda_available=True, env={}) == {}
    ds = dist.accelerator_kwargs(cuda_available=False, env={"ACCELERATE_USE_DEEPSPEED": "true"})
    (handler,) = ds["kwargs_handlers"]
    assert "cpu" not in ds and handler.backend == "gloo"


def test_verify_world_catches_the_silent_single_process_trap():
    ok = SimpleNamespace(num_processes=2, distributed_type="DistributedType.MULTI_CPU")
    dist.verify_world(ok, env={"WORLD_SIZE": "2"})
    alone = SimpleNamespace(num_processes=1, distributed_type="DistributedType.NO")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2"):
        dist.verify_world(alone, env={"WORLD_SIZE": "2"})
    with pytest.raises(RuntimeError, match="DeepSpeed"):
        dist.verify_world(ok, env={"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"})


def _train_sh(env_extra: dict, *args: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ACCELERATE_"))}
    env.update(DRY_RUN="1", **env_extra)
    res = subprocess.run(
        ["bash", str(REPO / "launch" / "train.sh"), *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def test_train_sh_cpu_default_and_deepspeed():
    out = _train_sh({"MODE": "cpu"}, "--config", "c.yaml")
    assert out[0] == "ACCELERATE_USE_CPU=1" and "--multi_gpu" in out
    assert flag(out, "--num_processes") == "2" and out[-2:] == ["--config", "c.yaml"]
    out = _train_sh({"MODE": "deepspeed", "PROCS_PER_NODE": "3", "MAIN_PROCESS_PORT": "29999"})
    assert flag(out, "--deepspeed_config_file") == str(REPO / "ds_config.json")
    assert flag(out, "--num_processes") == "3" and flag(out, "--main_process_port") == "29999"


def test_train_sh_machines_and_slurm_single_node():
    out = _train_sh(
        {
            "MODE": "cpu",
            "PROCS_PER_NODE": "1",
            "NUM_MACHINES": "2",
            "MACHINE_RANK": "1",
            "MAIN_PROCESS_IP": "10.0.0.5",
        }
    )
    assert flag(out, "--machine_rank") == "1" and flag(out, "--main_process_ip") == "10.0.0.5"
    out = _train_sh({"MODE": "cpu", **slurm_env("localhost", 1, 0, job=10007)})
    assert flag(out, "--num_processes") == "2"
    assert flag(out, "--main_process_port") == str(C.DEFAULT_PORT + 7)


def test_train_sh_deepspeed_with_cpu_env_fails_early():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(DRY_RUN="1", MODE="deepspeed", ACCELERATE_USE_CPU="1")
    res = subprocess.run(
        ["bash", str(REPO / "launch" / "train.sh")],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "DeepSpeed cannot be combined" in res.stderr


def test_accelerate_yaml_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    want = {
        "accelerate_cpu.yaml": ("MULTI_GPU", 1),
        "accelerate_multi_gpu.yaml": ("MULTI_GPU", 1),
        "accelerate_multi_node.yaml": ("MULTI_GPU", 2),
        "accelerate_deepspeed.yaml": ("DEEPSPEED", 1),
    }
    for name, (kind, machines) in want.items():
        cfg = load_config_from_file(str(REPO / "launch" / name))
        assert str(cfg.distributed_type).endswith(kind), (name, cfg.distributed_type)
        assert cfg.num_machines == machines, name
    ds = load_config_from_file(str(REPO / "launch" / "accelerate_deepspeed.yaml"))
    assert ds.deepspeed_config["deepspeed_config_file"] == "ds_config.json"
    assert not ds.use_cpu


def test_ds_config_is_zero2_with_auto_values_and_no_optimizer():
    cfg = json.loads((REPO / "ds_config.json").read_text())
    assert cfg["zero_optimization"]["stage"] == 2
    assert "optimizer" not in cfg and "scheduler" not in cfg  # torch optimizer/scheduler
    for key in (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
    ):
        assert cfg[key] == "auto", key
    # accelerate can only fill these from model.config.hidden_size, which JSMModel lacks
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        assert isinstance(cfg["zero_optimization"][key], int), key
