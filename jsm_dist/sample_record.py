"""Debug hook: record which samples every training step delivered, on every rank.

``JSM_RECORD_SAMPLES=<file>`` makes each rank append one JSON line per training step::

    {"epoch", "step" (global step it trains), "rank", "pos" (global position of the step's
     first sample in the epoch's canonical order), "lr", "keys" (this rank's sample keys),
     "rgb" (per sample: 12 hex digits of blake2b over its augmented uint8 RGB rows)}

Padding steps (data/order.py) write nothing: they train on nothing. Each line is one
``os.write`` to a file opened with O_APPEND, so ranks never interleave within a line. Off
(no file, no cost) when the variable is unset. Tests use it to check the sample sequence
and augmentation of resumed and re-sliced runs; it is not meant for long runs.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from jsm_dist import schema

ENV = "JSM_RECORD_SAMPLES"


class SampleRecorder:
    def __init__(self, path: str | None, rank: int) -> None:
        self.path, self.rank = path, rank

    @classmethod
    def from_env(cls, rank: int) -> SampleRecorder:
        return cls(os.environ.get(ENV) or None, rank)

    def step(self, epoch: int, step: int, pos: int, lr: float, batch: dict, padding: bool):
        """Record one step's batch (integer or float images, before the device move)."""
        if self.path is None or padding:
            return
        rgb = batch[schema.RGB].numpy()
        digests = [hashlib.blake2b(np.ascontiguousarray(r).tobytes(), digest_size=6).hexdigest()
                   for r in rgb]  # fmt: skip
        line = {"epoch": epoch, "step": step, "rank": self.rank, "pos": pos, "lr": lr,
                "keys": list(batch[schema.KEY]), "rgb": digests}  # fmt: skip
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())
        finally:
            os.close(fd)
