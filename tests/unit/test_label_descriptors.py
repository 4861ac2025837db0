"""Open descriptors of the label store stay bounded as the corpus grows: a writer and a
reader keep at most a fixed number of shard files open, whatever the shard count."""

from __future__ import annotations

import os

import numpy as np

from jsm_dist.labels import LabelStore
from jsm_dist.labels import store as store_mod
from jsm_dist.labels import writer as writer_mod

SIZES = [4, 3, 5, 2, 4, 1, 3]
HW = (4, 4)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def value(shard: int, index: int, gen: int) -> int:
    return (shard * 31 + index * 7 + gen * 3) % 256


def test_writer_keeps_few_shards_open_and_loses_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_mod, "MAX_OPEN_SHARDS", 2)
    store = LabelStore.create(tmp_path / "labels", SIZES, HW)
    base = open_fds()
    peak = 0
    w = store.writer(0)
    # interleaved over every shard, each shard in two halves: shards are closed and
    # reopened between their writes, and the first half must survive the reopening
    for half in (0, 1):
        for s, n in enumerate(SIZES):
            idx = [i for i in range(n) if i % 2 == half]
            if idx:
                w.write(s, idx, np.stack([np.full(HW, value(s, i, 0), np.uint8) for i in idx]))
            peak = max(peak, open_fds() - base)
    w.close()
    assert peak <= 2
    assert open_fds() == base
    store.commit(0)
    for s, n in enumerate(SIZES):
        for i in range(n):
            assert int(store.read(s, i)[0, 0]) == value(s, i, 0), (s, i)
    # carry-over into the next generation reopens shards too (its reads of generation 0
    # go through the store's own reader descriptors, bounded separately)
    w = store.writer(1)
    peak = 0
    for s, n in enumerate(SIZES):
        if s % 2:
            w.carry_over(s, range(n))
        else:
            w.write(
                s, range(n), np.stack([np.full(HW, value(s, i, 1), np.uint8) for i in range(n)])
            )
        peak = max(peak, sum(st.fd is not None for st in w._shards.values()))
    w.close()
    store.commit(1, verify_checksums=True)  # the records' checksums match the files
    assert peak == 2
    for s, n in enumerate(SIZES):
        for i in range(n):
            assert int(store.read(s, i)[0, 0]) == value(s, i, s % 2 == 0), (s, i)


def test_reader_keeps_few_shards_open(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "MAX_OPEN_READS", 3)
    store = LabelStore.create(tmp_path / "labels", SIZES, HW)
    with store.writer(0) as w:
        for s, n in enumerate(SIZES):
            w.write(
                s, range(n), np.stack([np.full(HW, value(s, i, 0), np.uint8) for i in range(n)])
            )
    store.commit(0)
    store.close()
    base = open_fds()
    for _ in range(2):  # twice over: evicted shards are reopened
        for s, n in enumerate(SIZES):
            for i in range(n):
                assert int(store.read(s, i)[0, 0]) == value(s, i, 0)
            assert len(store._fds) <= 3 and open_fds() - base <= 3
    store.close()
    assert open_fds() == base
