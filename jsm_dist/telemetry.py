"""Training telemetry behind one small interface; only the main process writes anything.

    tel = Telemetry(run_dir, enabled=accelerator.is_main_process, tensorboard=True,
                    total_steps=steps)
    tel.log_step(step, {"loss": 0.7, "loss_sal": 0.5}, samples=global_batch,
                 step_time=dt_step, data_time=dt_wait, epoch=epoch, lr=lr)
    tel.log_event("refine", generation=3, seconds=41.2, label_change=0.031, label_mae=0.12)
    tel.log_images("refine", step, [{"rgb": rgb, "depth": d, "label": l, "candidate": c, "gt": g}])
    tel.close()

Outputs under ``out_dir`` (main process only): ``metrics.jsonl`` (one JSON object per line,
``kind`` = "start" | "step" | "event" | "images"; appended to, so a resumed run continues the
same log), ``images/<tag>_<step>.png`` grids, and TensorBoard event files under ``tb/`` when
``tensorboard=True``. A tqdm bar shows epoch, step, loss and samples/s. GPU utilisation and
memory come from pynvml when a GPU is there; without one ``nvmlInit`` raises ``NVMLError``
and GPU telemetry turns itself off. tqdm, TensorBoard and pynvml are imported only when used.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("rgb", "depth", "label", "candidate", "gt")
_PLACEHOLDER = 48  # grey for a missing cell (e.g. no GT for this sample)
_HEADER_PX = 14


def _scalar(value: Any) -> float:
    # float() on a CUDA tensor is a device sync point: callers pass values they already
    # reduced (e.g. every log interval), not every step's raw loss tensor.
    return float(value.item() if hasattr(value, "item") else value)


def _json_default(value: Any):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def to_uint8_image(array: Any) -> np.ndarray:
    """HxW or HxWx3 uint8 from a map or image: float in [0,1], uint8, uint16, bool, CHW tensor."""
    if hasattr(array, "detach"):
        array = array.detach().float().cpu().numpy()
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)  # CHW -> HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise ValueError(f"image cell must be HxW or HxWx3 (or CHW), got shape {a.shape}")
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.integer):  # e.g. raw uint16 depth: scale by its maximum
        top = max(int(a.max()), 1)
        return (a.astype(np.float64) * (255.0 / top)).round().astype(np.uint8)
    a = np.nan_to_num(a.astype(np.float64), nan=0.0)
    return (np.clip(a, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _resize_nearest(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if img.shape[:2] == (h, w):
        return img
    rows = (np.arange(h) * img.shape[0] / h).astype(np.int64)
    cols = (np.arange(w) * img.shape[1] / w).astype(np.int64)
    return img[rows][:, cols]


def image_grid(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    cell_size: tuple[int, int] | None = None,
    pad: int = 2,
    header: bool = True,
) -> np.ndarray:
    """One HxWx3 uint8 grid: a row per sample, a column per key (missing cells are grey).

    Columns default to IMAGE_COLUMNS present in any row, then any other keys in first-seen
    order. Cells are resized (nearest) to ``cell_size`` or the first cell's size. With
    ``header`` the column names are drawn above the columns.
    """
    if not rows:
        raise ValueError("image_grid needs at least one row")
    if columns is None:
        seen = [k for row in rows for k in row]
        columns = [c for c in IMAGE_COLUMNS if c in seen]
        columns += [k for k in dict.fromkeys(seen) if k not in columns]
    if not columns:
        raise ValueError("image_grid rows have no columns")
    cells = [[None if c not in row else to_uint8_image(row[c]) for c in columns] for row in rows]
    if cell_size is None:
        cell_size = next(cell.shape[:2] for r in cells for cell in r if cell is not None)
    ch, cw = cell_size
    top = _HEADER_PX if header else 0
    grid_h = top + len(rows) * (ch + pad) + pad
    grid_w = len(columns) * (cw + pad) + pad
    grid = np.full((grid_h, grid_w, 3), 255, dtype=np.uint8)
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            y, x = top + pad + i * (ch + pad), pad + j * (cw + pad)
            if cell is None:
                grid[y : y + ch, x : x + cw] = _PLACEHOLDER
                continue
            cell = _resize_nearest(cell, (ch, cw))
            grid[y : y + ch, x : x + cw] = cell[..., None] if cell.ndim == 2 else cell
    if header:
        from PIL import Image, ImageDraw

        pil = Image.fromarray(grid)
        draw = ImageDraw.Draw(pil)
        for j, name in enumerate(columns):
            draw.text((pad + j * (cw + pad) + 2, 1), str(name)[: max(cw // 6, 1)], fill=(0, 0, 0))
        grid = np.asarray(pil)
    return grid


class GpuMonitor:
    """pynvml utilisation/memory of one GPU; ``available`` is False (and reads are empty)
    when pynvml is missing or there is no GPU/driver (``nvmlInit`` raises NVMLError)."""

    def __init__(self, index: int | None = None) -> None:
        self.available = False
        self.reason = ""
        self._nvml = None
        self._handle = None
        try:
            import pynvml
        except ImportError as exc:
            self.reason = f"pynvml not installed ({exc})"
            return
        try:
            pynvml.nvmlInit()
            if index is None:
                index = int(os.environ.get("LOCAL_RANK", "0"))
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError as exc:
            self.reason = f"no GPU telemetry: {exc.__class__.__name__}: {exc}"
            return
        self._nvml = pynvml
        self.available = True

    def read(self) -> dict[str, float]:
        """{"gpu_util": %, "gpu_mem_used_mb": MiB, "gpu_mem_total_mb": MiB} or {}."""
        if not self.available:
            return {}
        try:
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        except self._nvml.NVMLError as exc:  # a GPU that goes away mid-run: stop asking
            logger.warning("pynvml read failed, GPU telemetry off: %s", exc)
            self.close()
            return {}
        return {
            "gpu_util": float(util.gpu),
            "gpu_mem_used_mb": mem.used / 2**20,
            "gpu_mem_total_mb": mem.total / 2**20,
        }

    def close(self) -> None:
        if self.available and self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
        self.available = False


class Telemetry:
    """Run log, progress bar, TensorBoard and image grids for the main process.

    Args:
        out_dir: run directory; files go here (created on the main process only).
        enabled: False on non-main ranks: every method is then a cheap no-op that writes,
            creates and imports nothing.
        tensorboard: also write TensorBoard scalars/images under ``out_dir/tb``
            (ignored when ``writer`` is given).
        total_steps: length of the progress bar (None: open-ended).
        progress: show a tqdm bar.
        gpu: poll pynvml (if a GPU exists) every ``gpu_every`` logged steps.
        writer: an existing SummaryWriter-like object (``add_scalar``, ``add_image``), e.g.
            ``accelerator.get_tracker("tensorboard", unwrap=True)``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        enabled: bool = True,
        tensorboard: bool = False,
        total_steps: int | None = None,
        progress: bool = True,
        gpu: bool = True,
        gpu_every: int = 10,
        writer: Any = None,
        desc: str = "train",
    ) -> None:
        if gpu_every < 1:
            raise ValueError(f"gpu_every must be >= 1, got {gpu_every}")
        if total_steps is not None and total_steps < 0:
            raise ValueError(f"total_steps must be >= 0 or None, got {total_steps}")
        self.enabled = bool(enabled)
        self.out_dir = Path(out_dir)
        self.gpu_every = gpu_every
        self._steps_logged = 0
        self._totals = {"samples": 0.0, "step_time": 0.0, "data_time": 0.0, "steps": 0}
        self._file = None
        self._bar = None
        self._writer = None
        self._own_writer = False
        self._gpu: GpuMonitor | None = None
        self._last_gpu: dict[str, float] = {}
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # held open for the run (appends + flush per record); closed in close()
        self._file = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if writer is not None:
            self._writer = writer
        elif tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.out_dir / "tb"))
            self._own_writer = True
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, desc=desc, dynamic_ncols=True, mininterval=1.0)
        if gpu:
            self._gpu = GpuMonitor()
            if not self._gpu.available:
                logger.info("%s", self._gpu.reason)
        self._write({"kind": "start", "pid": os.getpid(), "gpu": self.gpu_available})

    @property
    def gpu_available(self) -> bool:
        return bool(self._gpu is not None and self._gpu.available)

    def _write(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record, default=_json_default, allow_nan=True) + "\n")
        self._file.flush()

    def log_step(
        self,
        step: int,
        losses: Mapping[str, Any],
        samples: int,
        step_time: float,
        data_time: float = 0.0,
        *,
        epoch: int | None = None,
        lr: float | None = None,
    ) -> dict | None:
        """Log one (or one interval of) optimisation step(s).

        Args:
            step: global step after this update.
            losses: name -> scalar (floats preferred; tensors are converted with .item()).
            samples: samples processed in ``step_time`` over ALL ranks (global batch).
            step_time: wall seconds of the step(s), data wait included.
            data_time: the part of ``step_time`` spent waiting for the loader.
        Returns:
            The record written (None when disabled).
        """
        if not self.enabled:
            return None
        if step_time < 0 or data_time < 0:
            raise ValueError(f"times must be >= 0, got step_time={step_time}, data={data_time}")
        scalars = {name: _scalar(v) for name, v in losses.items()}
        rate = samples / step_time if step_time > 0 else math.nan
        wait = min(data_time / step_time, 1.0) if step_time > 0 else math.nan
        rec: dict[str, Any] = {"kind": "step", "step": int(step)}
        if epoch is not None:
            rec["epoch"] = int(epoch)
        if lr is not None:
            rec["lr"] = float(lr)
        rec.update(scalars)
        rec.update(
            samples=int(samples),
            step_time=float(step_time),
            data_time=float(data_time),
            samples_per_s=rate,
            data_wait_frac=wait,
        )
        if self._gpu is not None and self._gpu.available:
            if self._steps_logged % self.gpu_every == 0:
                self._last_gpu = self._gpu.read()
            rec.update(self._last_gpu)
        self._steps_logged += 1
        t = self._totals
        t["samples"] += samples
        t["step_time"] += step_time
        t["data_time"] += data_time
        t["steps"] += 1
        self._write(rec)
        if self._writer is not None:
            for key in (*scalars, "samples_per_s", "data_wait_frac", "lr", *self._last_gpu):
                if key in rec and not (isinstance(rec[key], float) and math.isnan(rec[key])):
                    self._writer.add_scalar(f"train/{key}", rec[key], int(step))
        if self._bar is not None:
            post = {"ep": epoch} if epoch is not None else {}
            if "loss" in scalars:
                post["loss"] = f"{scalars['loss']:.4f}"
            post["smp/s"] = f"{rate:.1f}"
            self._bar.set_postfix(post, refresh=False)
            self._bar.update(max(int(step) - self._bar.n, 0))
        return rec

    def log_event(self, name: str, step: int | None = None, **values: Any) -> dict | None:
        """Log a named event (refinement duration, label change/MAE/S-measure per generation...)."""
        if not self.enabled:
            return None
        if not name:
            raise ValueError("event name must not be empty")
        rec: dict[str, Any] = {"kind": "event", "name": name}
        if step is not None:
            rec["step"] = int(step)
        rec.update(values)
        self._write(rec)
        logger.info("%s: %s", name, {k: v for k, v in rec.items() if k not in ("kind", "name")})
        if self._writer is not None:
            x = int(step if step is not None else values.get("generation", 0))
            for key, value in values.items():
                if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{name}/{key}", float(value), x)
        return rec

    def log_images(
        self,
        tag: str,
        step: int,
        rows: Sequence[Mapping[str, Any]],
        columns: Sequence[str] | None = None,
    ) -> Path | None:
        """Write an image grid (rows of {"rgb", "depth", "label", "candidate", "gt"}) as
        ``images/<tag>_<step>.png`` and to TensorBoard. Returns the PNG path."""
        if not self.enabled:
            return None
        from PIL import Image

        grid = image_grid(rows, columns)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", tag).strip("_") or "images"
        path = self.out_dir / "images" / f"{safe}_{int(step):08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.png")
        Image.fromarray(grid).save(tmp)
        os.replace(tmp, path)  # a viewer never sees half a PNG
        if self._writer is not None:
            self._writer.add_image(tag, grid, int(step), dataformats="HWC")
        self._write({"kind": "images", "tag": tag, "step": int(step), "path": str(path)})
        return path

    def summary(self) -> dict[str, float]:
        """Totals over the logged steps: samples/s and data-wait fraction of the whole run."""
        t = self._totals
        st = t["step_time"]
        return {
            "steps": t["steps"],
            "samples": t["samples"],
            "samples_per_s": t["samples"] / st if st > 0 else math.nan,
            "data_wait_frac": t["data_time"] / st if st > 0 else math.nan,
        }

    def close(self) -> None:
        """Flush and close everything (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            if hasattr(self._writer, "flush"):
                self._writer.flush()
            if self._own_writer:  # a writer passed in belongs to its owner (e.g. accelerate)
                self._writer.close()
            self._writer = None
        if self._gpu is not None:
            self._gpu.close()
            self._gpu = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
