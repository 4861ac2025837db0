"""A deterministic stand-in for JSMModel in refinement-pass tests (``from refine_stub import ...``).

``IdModel.refine(batch)`` answers, for each sample of the batch, a label whose every pixel is
``new_label_value(shard, index, generation)`` and the confidences ``(w_g, w_d) =
stub_weights(shard, index, generation)``, both read off the batch's id tensors. After a pass
every sample's new label and side columns in the store are therefore known exactly: a label
written to another sample, an old label written back, or a sample left out all show up in
:func:`check_refined_generation`. The stand-in also records which samples it was given and
the value of their current label, so a test can check that each sample was refined once,
by the rank that owns its shard, from the current generation's label.

Used in process by tests/unit/test_refine.py and by the ranks of
tests/integration/test_refine_dist.py.
"""

from __future__ import annotations

import time
from collections.abc import Collection

import numpy as np
import torch

from jsm_dist import schema
from jsm_dist.data.stream import DataConfig
from jsm_dist.labels import LabelStore


def new_label_value(shard: int, index: int, generation: int) -> int:
    """The uint8 value of every pixel of the stand-in's label for (shard, index) in
    ``generation``: distinct between neighbours, between shards and between generations."""
    return (shard * 29 + index * 13 + generation * 71) % 241 + 7


def stub_weights(shard: int, index: int, generation: int) -> tuple[float, float]:
    """The stand-in's (w_g, w_d): sixteenths, exact in float32, never 0.5 for all samples."""
    w_g = ((shard * 5 + index * 3 + generation) % 15 + 1) / 16
    return w_g, 1.0 - w_g


def data_config(num_workers: int = 0) -> DataConfig:
    """Loader settings of the refinement tests: 32 px, batches of 3 (they straddle shards)."""
    return DataConfig(train_size=32, batch_size=3, num_workers=num_workers, augment=False)


class IdModel(torch.nn.Module):
    """Stand-in with ``JSMModel.refine``'s interface; ``generation`` is the one being written."""

    def __init__(self, generation: int, crf_sleep: float = 0.0) -> None:
        super().__init__()
        self.generation = generation
        self.crf_sleep = crf_sleep  # seconds per batch reported as spent in the CRF
        self.seen: list[tuple[int, int, int]] = []  # (shard, index, current label value)

    @torch.no_grad()
    def refine(self, batch: dict, text=None, timings=None) -> dict[str, torch.Tensor]:
        if self.crf_sleep:
            time.sleep(self.crf_sleep)
            if timings is not None:
                timings["crf"] = timings.get("crf", 0.0) + self.crf_sleep
        shards = batch[schema.SHARD].tolist()
        indices = batch[schema.INDEX].tolist()
        b, _, h, w = batch[schema.RGB].shape
        g = self.generation
        old = (batch[schema.LABEL][:, 0].float() * 255.0).round().to(torch.int64)
        for s, i, o in zip(shards, indices, old):
            if int(o.min()) != int(o.max()):
                raise AssertionError(f"sample ({s}, {i}): current label is not constant")
            self.seen.append((s, i, int(o[0, 0])))
        values = torch.tensor([new_label_value(s, i, g) for s, i in zip(shards, indices)])
        label = (values.float() / 255.0).view(b, 1, 1, 1).expand(b, 1, h, w).contiguous()
        conf = torch.tensor([stub_weights(s, i, g) for s, i in zip(shards, indices)])
        return {"label": label, "conf": conf.float()}


def expected_side(shard: int, index: int, generation: int) -> np.ndarray:
    """The side columns (w_g, w_d, writer generation) of a sample the pass refined."""
    return np.array([*stub_weights(shard, index, generation), generation], np.float32)


def check_refined_generation(
    store: LabelStore, generation: int, corrupt: Collection[tuple[int, int]] = ()
) -> None:
    """Assert every sample of committed ``generation`` holds exactly what the stand-in gave it.

    ``corrupt``: samples the pass could not read. Such a sample keeps its label of
    ``generation - 1`` (carry-over) and is marked in its side columns: its side row must
    differ from the row of a refined sample.
    """
    store.refresh()
    assert store.generation == generation, (store.generation, generation)
    h, w = store.label_size
    for s, n in enumerate(store.shard_sizes):
        labels = store.memmap(s, generation)
        side = store.read_side(s, generation=generation)
        values = np.array([new_label_value(s, i, generation) for i in range(n)], np.uint8)
        want = np.broadcast_to(values[:, None, None], (n, h, w)).copy()
        want_side = np.array([expected_side(s, i, generation) for i in range(n)], np.float32)
        want_side = want_side.reshape(n, len(store.side_columns))
        for i in range(n):
            if (s, i) in corrupt:
                want[i] = store.memmap(s, generation - 1)[i]
                assert not np.array_equal(side[i], want_side[i]), f"({s}, {i}) not marked"
                want_side[i] = side[i]
        np.testing.assert_array_equal(labels, want, err_msg=f"labels of shard {s}")
        np.testing.assert_array_equal(side, want_side, err_msg=f"side columns of shard {s}")
