"""launch/gpu_check.sh and benchmarks/gpu_throughput.py on a machine without CUDA: one clear
line and exit 0; the launch commands it would run; the figures it reads from metrics.jsonl."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_throughput
from jsm_dist.config import parse_cli

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_without_cuda_prints_one_line_and_exits_0():
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this runs the same everywhere
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(
        ["bash", str(REPO / "launch" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], res.stdout
    assert "passed" not in res.stdout + res.stderr  # the gpu tests never ran


def test_benchmark_without_cuda_prints_one_line_and_returns_0(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_throughput.main(["--steps", "20"]) == 0
    assert capsys.readouterr().out.strip() == gpu_throughput.NO_CUDA


def test_dry_run_launches_ddp_and_zero2_with_valid_training_settings(capsys):
    assert gpu_throughput.main(["--dry-run", "--procs", "2", "--corpus", "C"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert set(lines) == {"gpu", "deepspeed"}
    for mode, line in lines.items():
        cmd = shlex.split(line)
        assert cmd[cmd.index("--num_processes") + 1] == "2"
        assert cmd[cmd.index("--mixed_precision") + 1] == "bf16"
        assert ("--use_deepspeed" in cmd) == (mode == "deepspeed")
        if mode == "deepspeed":
            ds = Path(cmd[cmd.index("--deepspeed_config_file") + 1])
            assert json.loads(ds.read_text())["zero_optimization"]["stage"] == 2
        # the training part parses into a valid run config (a misspelt setting fails here)
        cfg, _ = parse_cli(cmd[cmd.index("jsm_dist.train") + 1 :])
        assert cfg.model.encoder == "resnet50" and not cfg.model.pretrained
        assert cfg.data.train_size == 352 and cfg.train.tau == 0
        assert cfg.train.mixed_precision == "bf16" and cfg.train.max_steps_per_epoch == 60


def test_summary_leaves_out_warmup_steps(tmp_path):
    recs = [{"kind": "start"}]
    for i in range(5):  # warm-up steps are slow; steps 2.. take 0.5 s for 16 samples
        rec = {"kind": "step", "samples": 16, "step_time": 4.0 if i < 2 else 0.5}
        rec["data_time"] = 0.0 if i < 2 else 0.1
        if i % 2 == 0:
            rec.update(gpu_util=10.0 * i, gpu_mem_used_mb=1000.0 + i)
        recs.append(rec)
    recs.append({"kind": "event", "name": "done"})
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    got = gpu_throughput.summarize(path, warmup=2)
    assert got["steps"] == 3
    assert got["samples_per_s"] == pytest.approx(48 / 1.5)
    assert got["data_wait_frac"] == pytest.approx(0.3 / 1.5)
    assert got["gpu_util_mean"] == pytest.approx(30.0)  # steps 2 and 4
    assert got["gpu_mem_used_mb_max"] == 1004.0
