"""Checkpoints: accelerator state + train state, written so that only complete ones count.

Layout::

    <out_dir>/checkpoints/step-00000120/        accelerator.save_state() output
                                                (model, optimizer, scheduler, RNG per rank)
                                  train_state.json   epoch, samples consumed, step, label gen
                                  config.json        the resolved run config
    <out_dir>/checkpoints/step-00000120.tmp/    a checkpoint being written (ignored)

Every rank calls :meth:`Checkpointer.save` (DeepSpeed writes one shard per rank). The
checkpoint is written into ``*.tmp``; after a barrier rank 0 adds ``train_state.json``
and renames the directory into place with ``os.replace``, so a crash at any point leaves
the previous checkpoint the newest complete one. Older checkpoints beyond ``keep`` are
deleted after the rename.

The data position is a sample count (``samples_in_epoch``), not a step: a checkpoint
written by W processes resumes on any number of them (docs/resume.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from jsm_dist.fileperm import follow_umask

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainState:
    """Where the run is: enough to resume exactly (with the accelerator state)."""

    epoch: int = 0  # epochs fully trained
    samples_in_epoch: int = 0  # positions of epoch `epoch`'s canonical order consumed (the
    # data position, data/order.py: the same meaning for any world size)
    samples_seen: int = 0  # positions consumed over all epochs (the learning-rate clock)
    step_in_epoch: int = 0  # steps taken in epoch `epoch` (by whatever world sizes; for logs)
    global_step: int = 0  # optimizer micro-steps so far
    label_generation: int = 0  # label-store generation the run is training on
    refine_pending: bool = False  # a refinement is due before training continues
    refinements: int = 0  # refinement passes completed

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


class Checkpointer:
    def __init__(self, out_dir: str | Path, keep: int = 2) -> None:
        self.root = Path(out_dir) / "checkpoints"
        self.keep = keep

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [
            p
            for p in self.root.iterdir()
            if p.is_dir() and _NAME.match(p.name) and (p / "train_state.json").is_file()
        ]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def resolve(self, resume: str) -> Path | None:
        """``latest`` -> newest complete checkpoint (None when there is none); else a path."""
        if not resume:
            return None
        if resume == "latest":
            return self.latest()
        path = Path(resume)
        if not (path / "train_state.json").is_file():
            what = (
                "not a complete checkpoint (it has no train_state.json)"
                if path.is_dir()
                else "no such directory"
            )
            done = self.complete()
            have = f"newest complete: {done[-1]}" if done else f"none complete in {self.root}"
            raise FileNotFoundError(
                f"--resume {resume}: {what}; give a checkpoint directory ({have}) or "
                "--resume latest"
            )
        return path

    def save(self, accelerator, state: TrainState, config_json: str) -> Path:
        final = self.root / f"step-{state.global_step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        follow_umask(tmp)  # safetensors writes the weights 0600; each rank fixes its own files
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / "config.json").write_text(config_json)
            _write_synced(tmp / "train_state.json", state.to_json())
            if final.exists():  # same step saved twice (e.g. epoch end == step interval)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            log.info(
                "checkpoint %s (epoch %d, step %d, label gen %d)",
                final.name,
                state.epoch,
                state.global_step,
                state.label_generation,
            )
        accelerator.wait_for_everyone()
        return final

    @staticmethod
    def load(accelerator, path: Path, samples_per_step: int) -> TrainState:
        """Restore the accelerator state and return the train state.

        A checkpoint from before the sample-count data position has only steps: its
        position is taken as ``steps x samples_per_step`` (this job's world size x batch),
        exact when the world size and batch are the ones it was written with.
        """
        accelerator.load_state(str(path))
        data = json.loads((path / "train_state.json").read_text())
        if "samples_in_epoch" not in data:
            data["samples_in_epoch"] = data.get("step_in_epoch", 0) * samples_per_step
            data["samples_seen"] = data.get("global_step", 0) * samples_per_step
            log.warning(
                "%s records steps, not samples: resuming at sample %d of epoch %d (steps x "
                "%d samples per step); the order of samples in an epoch is the new one",
                path, data["samples_in_epoch"], data.get("epoch", 0), samples_per_step,
            )  # fmt: skip
        return TrainState(**data)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
