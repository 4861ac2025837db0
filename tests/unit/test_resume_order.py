"""Data position as a sample count: resume without replay, and re-slicing for another
world size (jsm_dist/data/order.py, the training loader's ``start``). Ranks are simulated
with ``WorldInfo`` here; tests/integration/test_resume_elastic.py runs real jobs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import all_ids, garble_member, make_tiny_corpus

from jsm_dist.data import decode, order
from jsm_dist.data.stream import DataConfig, make_train_loader
from jsm_dist.dist import WorldInfo

SIZES = [7, 5, 9, 6, 8, 7]  # 42 samples, uneven shards


def _cfg(**kw) -> DataConfig:
    base = {"train_size": 32, "batch_size": 3, "num_workers": 0, "shuffle_buffer": 10}
    return DataConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("c"), shard_sizes=SIZES)


def _run(corpus, world_size: int, start: int = 0, epoch: int = 1, **kw) -> list[list[dict]]:
    """Each rank's batches (as (key, rgb) lists per step) of one loader from ``start``."""
    cfg = _cfg(**kw)
    per_rank = []
    for rank in range(world_size):
        loader = make_train_loader(
            corpus, cfg, epoch=epoch, seed=7, world=WorldInfo(rank, world_size), start=start
        )
        batches = list(loader)
        assert len(batches) == len(loader)
        per_rank.append(
            [{"keys": b["key"], "rgb": b["rgb"], "pad": b.get("_padding", False)} for b in batches]
        )
    return per_rank


def _samples(per_rank: list[list[dict]]) -> dict[str, torch.Tensor]:
    """key -> augmented rgb of every non-padding sample (asserting none comes twice)."""
    out = {}
    for batches in per_rank:
        for b in batches:
            if b["pad"]:
                continue
            for key, rgb in zip(b["keys"], b["rgb"]):
                assert key not in out, f"{key} delivered twice"
                out[key] = rgb
    return out


def _key(s: int, i: int) -> str:
    return f"tiny_{s:03d}_{i:04d}"


def test_epoch_order_is_a_seeded_permutation_of_the_corpus():
    ids = order.epoch_order(SIZES, seed=7, epoch=1, window=10)
    assert sorted(map(tuple, ids.tolist())) == sorted(all_ids_of(SIZES))
    assert (ids == order.epoch_order(SIZES, seed=7, epoch=1, window=10)).all()
    assert not (ids == order.epoch_order(SIZES, seed=7, epoch=2, window=10)).all()
    # shuffle groups of >= 10 samples: the first 10 positions mix two shards
    assert len({s for s, _ in ids[:10].tolist()}) == 2
    # window 1: whole shards in tar order
    plain = order.epoch_order(SIZES, seed=7, epoch=1, window=1).tolist()
    first = plain[0][0]
    assert plain[: SIZES[first]] == [[first, i] for i in range(SIZES[first])]


def all_ids_of(sizes):
    return {(s, i) for s, n in enumerate(sizes) for i in range(n)}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_uninterrupted_tail_and_decodes_nothing_before_it(
    corpus, tmp_path, monkeypatch, workers
):
    full = _run(corpus, 2, num_workers=workers)
    log = tmp_path / f"decoded{workers}.txt"
    real = decode.SampleDecoder.__call__

    def counting(self, raw):
        with open(log, "a") as f:  # forked workers inherit the patch
            f.write(raw["__key__"] + "\n")
        return real(self, raw)

    monkeypatch.setattr(decode.SampleDecoder, "__call__", counting)
    start = 12  # 2 steps of 2 ranks x 3
    resumed = _run(corpus, 2, start=start, num_workers=workers)
    for rank in range(2):
        tail = full[rank][2:]
        got = resumed[rank]
        assert [b["keys"] for b in got] == [b["keys"] for b in tail]
        for g, w in zip(got, tail):
            assert torch.equal(g["rgb"], w["rgb"])  # same augmentation draws
    decoded = log.read_text().split()
    assert len(decoded) == corpus.num_samples - start  # the 12 consumed: never decoded
    skipped = {k for b in full[0][:2] + full[1][:2] for k in b["keys"]}
    assert not skipped & set(decoded)


@pytest.mark.parametrize("before, after, steps", [(2, 1, 3), (1, 2, 5), (4, 2, 1), (2, 3, 2)])
def test_resume_on_another_world_size_delivers_the_rest_exactly_once(corpus, before, after, steps):
    """``steps`` steps on ``before`` ranks, then the rest of the epoch on ``after`` ranks:
    every sample once, each with the augmentation an uninterrupted run gives it."""
    consumed = steps * before * 3
    first = _run(corpus, before)
    head = [b for batches in first for b in batches[:steps]]
    rest = _run(corpus, after, start=consumed)
    seen = _samples([head] + rest)
    assert sorted(seen) == sorted(_key(s, i) for s, i in all_ids(corpus))
    # the head is exactly the first `consumed` positions of the canonical order
    ids = order.epoch_order(SIZES, seed=7, epoch=1, window=10)[:consumed].tolist()
    assert sorted(k for b in head for k in b["keys"]) == sorted(_key(s, i) for s, i in ids)
    reference = _samples(first)  # uninterrupted, on `before` ranks
    for key, rgb in seen.items():
        assert torch.equal(rgb, reference[key]), key


def test_fewer_samples_left_than_ranks_gives_flagged_padding_batches(corpus):
    runs = _run(corpus, 4, start=40)  # 2 positions left for 4 ranks
    assert [len(r) for r in runs] == [1, 1, 1, 1]  # one step each: equal step counts
    assert [r[0]["pad"] for r in runs] == [True, False, True, False]
    assert sorted(_samples(runs)) == sorted(
        _key(s, i) for s, i in order.epoch_order(SIZES, 7, 1, 10)[40:].tolist()
    )


def test_corrupt_sample_in_the_skipped_part_shifts_nothing(tmp_path):
    clean = make_tiny_corpus(tmp_path / "a", shard_sizes=SIZES)
    broken = make_tiny_corpus(tmp_path / "b", shard_sizes=SIZES)
    start = 12
    ids = order.epoch_order(SIZES, seed=7, epoch=1, window=10).tolist()
    for s, i in ids[3:5]:  # two samples of the consumed part
        garble_member(broken.shard_paths[s], f"{_key(s, i)}.rgb.png")
    want = _run(clean, 2)
    got = _run(broken, 2, start=start)
    for rank in range(2):
        assert [b["keys"] for b in got[rank]] == [b["keys"] for b in want[rank][2:]]
        for g, w in zip(got[rank], want[rank][2:]):
            assert torch.equal(g["rgb"], w["rgb"])
    # the uninterrupted run over the broken corpus: a hole where each corrupt sample was
    whole = _run(broken, 2)
    delivered = Counter(k for r in whole for b in r for k in b["keys"])
    assert sum(delivered.values()) == broken.num_samples - 2
    assert [b["keys"] for b in whole[0][2:]] == [b["keys"] for b in want[0][2:]]


def test_truncated_shard_leaves_holes_where_its_lost_samples_were(tmp_path):
    """The member index of a truncated tar covers the samples before the break; the rest
    count as corrupt, each a hole at its own position (nothing after them moves)."""
    corpus = make_tiny_corpus(tmp_path, shard_sizes=SIZES)
    want = _samples(_run(corpus, 1))
    path = Path(corpus.shard_paths[2])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    loader = make_train_loader(corpus, _cfg(), epoch=1, seed=7, world=WorldInfo(), start=0)
    batches = list(loader)
    got = {k: rgb for b in batches for k, rgb in zip(b["key"], b["rgb"])}
    lost = set(want) - set(got)
    assert lost and all(k.startswith("tiny_002_") for k in lost)
    assert any(k.startswith("tiny_002_") for k in got)  # the samples before the break
    assert loader.stats["skipped"] == len(lost) and loader.stats["reasons"]["missing sample"] >= 1
    for key, rgb in got.items():
        assert torch.equal(rgb, want[key]), key
