"""Unreadable samples keep their label: writer.carry_over, and the refinement pass using it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import garble_member, make_tiny_corpus

from jsm_dist.data.stream import DataConfig
from jsm_dist.dist import WorldInfo
from jsm_dist.labels import IncompleteGenerationError, LabelStore, LabelStoreError

SIZES = [5, 3, 0, 4]
HW = (6, 4)


@pytest.fixture
def store(tmp_path: Path) -> LabelStore:
    st = LabelStore.create(tmp_path / "labels", SIZES, HW)
    rng = np.random.default_rng(0)
    with st.writer(0) as w:
        for s, n in enumerate(SIZES):
            w.write(s, range(n), rng.integers(0, 256, (n, *HW), dtype=np.uint8),
                    rng.random((n, 2), dtype=np.float32))  # fmt: skip
    st.commit(0)
    return st


def write_all_but(store: LabelStore, g: int, skip: dict[int, list[int]], value: int):
    w = store.writer(g)
    for s, n in enumerate(SIZES):
        idx = [i for i in range(n) if i not in skip.get(s, [])]
        w.write(s, idx, np.full((len(idx), *HW), value, np.uint8), np.full((len(idx), 2), 0.5))
    return w


def test_carried_over_sample_keeps_its_label_and_is_marked(store: LabelStore) -> None:
    old = {s: store.memmap(s).copy() for s in range(len(SIZES))}
    old_side = {s: store.read_side(s) for s in range(len(SIZES)) if SIZES[s]}
    skip = {0: [1, 4], 3: [0]}
    w = write_all_but(store, 1, skip, 200)
    assert w.unwritten(0).tolist() == [1, 4] and w.unwritten(1).tolist() == []
    assert sum(w.carry_over(s, idx) for s, idx in skip.items()) == 3
    assert w.unwritten(0).tolist() == []
    w.close()
    store.commit(1)
    assert store.manifest["generations"][-1]["carried_over"] == 3
    for s, n in enumerate(SIZES):
        labels, side = store.memmap(s), store.read_side(s)
        for i in range(n):
            if i in skip.get(s, []):
                assert labels[i].tobytes() == old[s][i].tobytes()  # byte for byte
                assert side[i, -1] == 0 and np.isnan(side[i, :2]).all()
            else:
                assert (labels[i] == 200).all() and side[i, -1] == 1 and side[i, 0] == 0.5
    # carried again: the writer-generation column still names the generation that wrote it
    w = write_all_but(store, 2, {0: [1]}, 100)
    w.carry_over(0, [1])
    w.close()
    store.commit(2)
    assert store.read(0, 1).tobytes() == old[0][1].tobytes()
    assert store.read_side(0, [1])[0, -1] == 0 and old_side[0][1, -1] == 0


def test_forgotten_samples_still_refuse_the_commit(store: LabelStore) -> None:
    w = write_all_but(store, 1, {0: [1, 4], 3: [0]}, 200)
    w.carry_over(0, [1, 4])  # shard 3's sample is neither written nor carried over
    w.close()
    with pytest.raises(IncompleteGenerationError, match=r"shard 3: 3 of 4"):
        store.commit(1)
    assert store.generation == 0


def test_carry_over_never_replaces_a_new_label(store: LabelStore) -> None:
    w = write_all_but(store, 1, {0: [1]}, 200)
    with pytest.raises(LabelStoreError, match="already wrote"):
        w.carry_over(0, [0, 1])
    w.abort()
    other = store.writer(1, world=WorldInfo(rank=1, world_size=2))  # owns shards 1 and 3
    with pytest.raises(LabelStoreError, match="does not own"):
        other.carry_over(0, [1])
    other.abort()
    fresh = LabelStore.create(store.root.parent / "empty", [2], HW)
    w0 = fresh.writer(0)
    with pytest.raises(LabelStoreError, match="generation -1 is not committed"):
        w0.carry_over(0, [0])
    w0.abort()


# ---- the refinement pass, one process -----------------------------------------------------
def test_refinement_carries_an_unreadable_sample_over_and_commits(tmp_path: Path) -> None:
    import torch

    from jsm_dist.models import JSMModel, ModelConfig
    from jsm_dist.refine.refinement import refine_labels

    corpus = make_tiny_corpus(tmp_path, shard_sizes=[4, 3])
    garble_member(corpus.shard_paths[1], "tiny_001_0001.rgb.png")
    store = LabelStore.open(corpus.label_dir)
    before = np.stack([store.read(s, i) for s, n in enumerate(corpus.shard_sizes)
                       for i in range(n)])  # fmt: skip
    torch.manual_seed(0)
    cfg = ModelConfig(encoder="tiny", text_model="tiny", text_hidden=32, text_heads=2, crf=False,
                      pretrained=False)  # fmt: skip
    model = JSMModel(cfg, corpus.vocab)
    data = DataConfig(train_size=32, batch_size=2, num_workers=0)
    stats = refine_labels(model, corpus, store, data, progress=False)
    assert stats.generation == 1 and store.generation == 1
    assert stats.carried_over == 1 and stats.samples == 6
    assert store.read(1, 1).tobytes() == before[4 + 1].tobytes()  # its generation-0 label
    side = store.read_side(1)
    assert side[:, -1].tolist() == [1, 0, 1]  # carried over: still written by generation 0
    assert np.isnan(side[1, :-1]).all()
    assert store.manifest["generations"][-1]["carried_over"] == 1
