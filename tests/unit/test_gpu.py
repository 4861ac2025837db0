"""What only a CUDA machine can show: NCCL, bf16 autocast of the model, real pynvml readings.

Marked ``gpu``: tests/conftest.py runs them wherever torch sees a CUDA device and skips them,
saying so, where it sees none (the CPU paths they mirror are tested elsewhere).
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from benchmarks.model import make_batch
from jsm_dist import schema
from jsm_dist.models import JSMModel, ModelConfig

pytestmark = pytest.mark.gpu

VOCAB = ["<negative>", "ball", "ring", "square", "triangle", "star", "heart", "arrow", "hexagon"]


def test_nccl_process_group_on_one_gpu(tmp_path):
    import torch.distributed as td

    from jsm_dist import dist

    torch.cuda.set_device(0)
    store = td.FileStore(str(tmp_path / "rendezvous"), 1)
    td.init_process_group("nccl", store=store, rank=0, world_size=1, timeout=timedelta(seconds=60))
    try:
        assert td.get_backend() == "nccl"
        assert dist.world_info() == dist.WorldInfo(0, 1, 0)
        t = torch.arange(4.0, device="cuda")
        td.all_reduce(t)
        assert t.tolist() == [0.0, 1.0, 2.0, 3.0]
        box = [{"generation": 3}]
        td.broadcast_object_list(box, src=0)
        assert box == [{"generation": 3}]
        td.barrier()
    finally:
        td.destroy_process_group()


def test_bf16_autocast_forward_backward_and_refine():
    """The training step and the label update under bf16 autocast, as accelerate runs them
    with ``train.mixed_precision bf16``: losses close to fp32, fp32 gradients, labels in
    [0, 1]."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        encoder="tiny", text_model="tiny", text_hidden=32, text_heads=2, text_dropout=0.0, crf=False
    )
    model = JSMModel(cfg, VOCAB).cuda()
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in make_batch(2, 32, seed=1).items()}
    # eval mode for the comparison: batch statistics and the SSM's hard threshold in train
    # mode turn bf16 rounding into large, legitimate differences
    model.eval()
    with torch.no_grad():
        fp32 = {k: float(v) for k, v in model(batch).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = {k: float(v) for k, v in model(batch).items()}
    assert bf16 == pytest.approx(fp32, rel=0.02, abs=1e-3)
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(batch)
    assert all(torch.isfinite(v) for v in out.values()), out
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model.refine(batch)
    lab = ref["label"].float()
    assert lab.is_cuda and lab.shape == batch[schema.LABEL].shape
    assert float(lab.min()) >= 0 and float(lab.max()) <= 1
    assert torch.allclose(ref["conf"].float().sum(1), torch.ones(2, device="cuda"), atol=1e-2)


def test_gpu_monitor_reads_this_gpu():
    from jsm_dist.telemetry import GpuMonitor

    mon = GpuMonitor(index=0)
    assert mon.available, mon.reason
    try:
        keep = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 256 MiB held
        got = mon.read()
        # NVML's total is the device's (the parent GPU's under MIG): at least what torch sees
        total = torch.cuda.get_device_properties(0).total_memory / 2**20
        assert got["gpu_mem_total_mb"] >= 0.98 * total
        assert 256 <= got["gpu_mem_used_mb"] <= got["gpu_mem_total_mb"]
        assert 0.0 <= got["gpu_util"] <= 100.0
        del keep
    finally:
        mon.close()
    assert not mon.available and mon.read() == {}
