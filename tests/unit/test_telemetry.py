"""jsm_dist.telemetry: JSONL run log, PNG grids, no-op off the main process, pynvml paths."""

from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import pytest
from PIL import Image

from jsm_dist import telemetry as T


def read_log(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


class FakeWriter:
    def __init__(self):
        self.scalars, self.images, self.closed = [], [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_image(self, tag, img, step, dataformats="CHW"):
        self.images.append((tag, img.shape, step, dataformats))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_log_step_writes_jsonl_with_rates(tmp_path):
    writer = FakeWriter()
    with T.Telemetry(tmp_path, total_steps=5, gpu=False, writer=writer) as tel:
        samples, step_time, data_time = 32, 0.5, 0.125
        rec = tel.log_step(
            3, {"loss": 1.5, "loss_sal": 0.25}, samples, step_time, data_time, epoch=1, lr=0.01
        )
        tel.log_step(4, {"loss": 1.0}, 16, 0.25, 0.0, epoch=1)
        tel.log_event("refine", step=4, generation=1, seconds=2.5, label_change=0.1)
        summary = tel.summary()
    lines = read_log(tmp_path)
    assert [r["kind"] for r in lines] == ["start", "step", "step", "event"]
    step = lines[1]
    assert step == {**rec, "time": step["time"]}
    assert step["step"] == 3 and step["epoch"] == 1 and step["lr"] == 0.01
    assert step["loss"] == 1.5 and step["loss_sal"] == 0.25
    assert step["samples_per_s"] == pytest.approx(samples / step_time)
    assert step["data_wait_frac"] == pytest.approx(data_time / step_time)
    assert lines[3]["name"] == "refine" and lines[3]["generation"] == 1
    assert summary["samples_per_s"] == pytest.approx((32 + 16) / (0.5 + 0.25))
    assert summary["data_wait_frac"] == pytest.approx(0.125 / 0.75)
    tags = {t for t, _, _ in writer.scalars}
    assert {"train/loss", "train/samples_per_s", "refine/seconds", "refine/label_change"} <= tags
    assert not writer.closed  # a writer passed in belongs to its owner


def test_log_appends_across_restarts(tmp_path):
    for step in (1, 2):
        with T.Telemetry(tmp_path, progress=False, gpu=False) as tel:
            tel.log_step(step, {"loss": 0.5}, 4, 0.1)
    steps = [r["step"] for r in read_log(tmp_path) if r["kind"] == "step"]
    assert steps == [1, 2]


def test_log_images_writes_png_grid(tmp_path):
    h, w = 12, 16
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = 200
    rows = [
        {
            "rgb": rgb,
            "depth": np.full((h, w), 1000, np.uint16),
            "label": np.ones((1, h, w), np.float32),
            "candidate": np.zeros((h, w), np.float32),
            "gt": np.ones((h, w), bool),
        },
        {"rgb": rgb, "label": np.full((h, w), 0.5, np.float32)},  # no depth/candidate/gt
    ]
    writer = FakeWriter()
    with T.Telemetry(tmp_path, progress=False, gpu=False, writer=writer) as tel:
        path = tel.log_images("refine/gen 1", 7, rows)
    assert path == tmp_path / "images" / "refine_gen_1_00000007.png"
    grid = np.asarray(Image.open(path).convert("RGB"))
    pad, top = 2, T._HEADER_PX
    assert grid.shape == (top + 2 * (h + pad) + pad, 5 * (w + pad) + pad, 3)

    def cell(i, j):
        y, x = top + pad + i * (h + pad), pad + j * (w + pad)
        return grid[y : y + h, x : x + w]

    assert (cell(0, 0) == [200, 0, 0]).all()  # rgb
    assert (cell(0, 1) == 255).all()  # uint16 depth scaled by its max
    assert (cell(0, 2) == 255).all() and (cell(0, 3) == 0).all() and (cell(0, 4) == 255).all()
    assert (cell(1, 2) == 128).all()  # 0.5 -> 128
    assert (cell(1, 1) == T._PLACEHOLDER).all() and (cell(1, 4) == T._PLACEHOLDER).all()
    assert writer.images == [("refine/gen 1", grid.shape, 7, "HWC")]
    assert read_log(tmp_path)[-1] == {**read_log(tmp_path)[-1], "kind": "images", "step": 7}


def test_real_tensorboard_writer(tmp_path):
    with T.Telemetry(tmp_path, tensorboard=True, progress=False, gpu=False) as tel:
        tel.log_step(1, {"loss": 0.5}, 4, 0.1)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_disabled_is_a_no_op_that_imports_nothing(tmp_path, monkeypatch):
    # tensorboard/tqdm/pynvml made unimportable: a disabled Telemetry must not try them
    for mod in ("torch.utils.tensorboard", "tqdm.auto", "pynvml"):
        monkeypatch.setitem(sys.modules, mod, None)
    out = tmp_path / "run"
    tel = T.Telemetry(out, enabled=False, tensorboard=True, total_steps=3)
    assert tel.log_step(1, {"loss": 1.0}, 4, 0.1, 0.01) is None
    assert tel.log_event("refine", generation=1) is None
    assert tel.log_images("g", 1, [{"rgb": np.zeros((4, 4, 3), np.uint8)}]) is None
    tel.close()
    assert not out.exists()


def test_pynvml_without_gpu_is_a_clean_no_op(tmp_path):
    """Real pynvml here: nvmlInit raises NVMLError without a GPU (checked both ways)."""
    import pynvml

    try:
        pynvml.nvmlInit()
        has_gpu = True
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        has_gpu = False
    mon = T.GpuMonitor()
    assert mon.available is has_gpu
    if has_gpu:
        assert {"gpu_util", "gpu_mem_used_mb"} <= set(mon.read())
    else:
        assert mon.read() == {} and "NVMLError" in mon.reason
    mon.close()
    with T.Telemetry(tmp_path, progress=False) as tel:
        rec = tel.log_step(1, {"loss": 1.0}, 4, 0.1)
    assert ("gpu_util" in rec) is has_gpu and tel.gpu_available is False  # closed


def test_pynvml_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    mon = T.GpuMonitor()
    assert not mon.available and "not installed" in mon.reason and mon.read() == {}


def test_gpu_fields_with_a_fake_nvml(tmp_path, monkeypatch):
    fake = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    fake.NVMLError = NVMLError
    fake.nvmlInit = lambda: None
    fake.nvmlShutdown = lambda: None
    fake.nvmlDeviceGetHandleByIndex = lambda i: ("gpu", i)
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=87)
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with T.Telemetry(tmp_path, progress=False, gpu_every=2) as tel:
        first = tel.log_step(1, {"loss": 1.0}, 4, 0.1)
        fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=5)
        second = tel.log_step(2, {"loss": 1.0}, 4, 0.1)  # cached: polled every 2 steps
        third = tel.log_step(3, {"loss": 1.0}, 4, 0.1)
    assert first["gpu_util"] == 87 and first["gpu_mem_used_mb"] == 3 * 1024
    assert second["gpu_util"] == 87 and third["gpu_util"] == 5


def test_to_uint8_image_conversions():
    assert T.to_uint8_image(np.array([[0.0, 1.0], [2.0, math.nan]])).tolist() == [
        [0, 255],
        [255, 0],
    ]
    assert T.to_uint8_image(np.array([[0, 500]], np.uint16)).tolist() == [[0, 255]]
    assert T.to_uint8_image(np.zeros((3, 2, 5), np.float32)).shape == (2, 5, 3)  # CHW -> HWC
    with pytest.raises(ValueError, match=r"\(2, 2, 2\)"):
        T.to_uint8_image(np.zeros((2, 2, 2)))


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="gpu_every must be >= 1, got 0"):
        T.Telemetry(tmp_path, gpu_every=0)
    with (
        T.Telemetry(tmp_path, progress=False, gpu=False) as tel,
        pytest.raises(ValueError, match="step_time=-1"),
    ):
        tel.log_step(1, {}, 1, -1)
    with pytest.raises(ValueError, match="at least one row"):
        T.image_grid([])
