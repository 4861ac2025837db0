"""Streaming loaders: exactly-once evaluation, equal training batches, corrupt data."""

from __future__ import annotations

import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import all_ids, garble_member, label_value, make_raw_sample, make_tiny_corpus

from jsm_dist.data import decode
from jsm_dist.data.batching import to_float
from jsm_dist.data.stream import DataConfig, balanced_split, make_eval_loader, make_train_loader
from jsm_dist.dist import WorldInfo
from jsm_dist.labels import LabelStore

UNEVEN = [5, 1, 7, 3, 2, 4]


def _cfg(**kw) -> DataConfig:
    base = {"train_size": 32, "batch_size": 3, "num_workers": 0, "shuffle_buffer": 8}
    return DataConfig(**{**base, **kw})


def _ids(batches) -> list[tuple[int, int]]:
    return [(s, i) for b in batches for s, i in zip(b["shard"].tolist(), b["index"].tolist())]


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_every_sample_exactly_once_across_two_ranks(tmp_path, workers):
    corpus = make_tiny_corpus(tmp_path, shard_sizes=UNEVEN)
    seen = []
    for rank in range(2):
        loader = make_eval_loader(corpus, _cfg(num_workers=workers), world=WorldInfo(rank, 2))
        batches = list(loader)
        assert len(batches) == len(loader)
        ids = _ids(batches)
        assert all(s % 2 == rank for s, _ in ids)  # owner rule
        for b in batches:
            for j, (s, i) in enumerate(zip(b["shard"].tolist(), b["index"].tolist())):
                assert b["key"][j] == f"tiny_{s:03d}_{i:04d}"
                # the label read from the store is this sample's own
                assert b["label"][j].mean().item() == pytest.approx(
                    label_value(s, i) / 255, abs=1e-6
                )
        assert loader.stats["skipped"] == 0 and loader.stats["missing"] == {}
        seen += ids
    assert len(seen) == len(set(seen)) == corpus.num_samples
    assert set(seen) == all_ids(corpus)


def test_eval_batch_values_match_the_raw_samples(tmp_path):
    corpus = make_tiny_corpus(tmp_path, shard_sizes=[3, 2])
    batches = list(make_eval_loader(corpus, _cfg(), world=WorldInfo()))
    b = batches[0]
    assert b["rgb"].shape == (3, 3, 32, 32) and b["depth"].shape == (3, 1, 32, 32)
    assert all(t.dtype.is_floating_point for t in (b["rgb"], b["depth"], b["label"], b["gt"]))
    for j in range(3):
        s, i = int(b["shard"][j]), int(b["index"][j])
        raw = make_raw_sample(s, i, 32)
        np.testing.assert_allclose(
            b["rgb"][j].permute(1, 2, 0).numpy(), raw["rgb"] / 255.0, atol=1e-6
        )
        depth = decode.normalize_depth(raw["depth"])  # travels as 16 bits from the workers
        np.testing.assert_allclose(b["depth"][j, 0].numpy(), depth, atol=0.5 / 65535 + 1e-7)
        np.testing.assert_array_equal(b["gt"][j, 0].numpy(), raw["gt"] / 255.0)
        assert bool(b["has_gt"][j])
        assert corpus.vocab[int(b["word"][j])] == raw["meta"]["word"]
        assert b["caption"][j].split()[int(b["word_pos"][j])] == raw["meta"]["word"]
    near = b["depth"][0, 0].numpy()[make_raw_sample(0, 0, 32)["gt"] > 0]
    assert near.min() == pytest.approx(1.0)  # the nearer object is at 1 (near = large)


@pytest.mark.parametrize("world_size, workers", [(2, 0), (2, 2), (3, 1)])
def test_train_equal_batch_counts_per_rank_with_uneven_shards(tmp_path, world_size, workers):
    corpus = make_tiny_corpus(tmp_path, shard_sizes=[20, 1, 1, 2, 9, 3])
    counts = []
    for rank in range(world_size):
        loader = make_train_loader(
            corpus, _cfg(num_workers=workers), epoch=1, seed=5, world=WorldInfo(rank, world_size)
        )
        batches = list(loader)
        counts.append((len(loader), len(batches)))
        assert all(b["rgb"].shape == (3, 3, 32, 32) for b in batches)
        for s, i in _ids(batches):
            assert 0 <= i < corpus.shard_sizes[s]
    expected = corpus.num_samples // (world_size * 3)
    assert counts == [(expected, expected)] * world_size


def test_train_stream_is_epoch_seeded_and_reproducible(tmp_path):
    corpus = make_tiny_corpus(tmp_path, shard_sizes=[6, 6, 6, 6])

    def keys(epoch, seed=0):
        loader = make_train_loader(corpus, _cfg(), epoch=epoch, seed=seed, world=WorldInfo())
        return [k for b in loader for k in b["key"]]

    assert keys(0) == keys(0)
    assert keys(0) != keys(1)
    assert keys(0) != keys(0, seed=1)
    # one epoch ~ one pass: every sample shows up (24 samples, 8 batches of 3, one rank)
    assert len(set(keys(2))) == 24


def test_train_batches_reproducible_with_workers_and_stats_after_len_batches(tmp_path):
    corpus = make_tiny_corpus(tmp_path, shard_sizes=[7, 5, 6, 4])
    cfg = _cfg(num_workers=2)

    def take(loader):
        it = iter(loader)  # the train loop takes exactly len() batches and never resumes
        return [next(it) for _ in range(len(loader))]

    a = make_train_loader(corpus, cfg, epoch=3, seed=2, world=WorldInfo())
    b = make_train_loader(corpus, cfg, epoch=3, seed=2, world=WorldInfo())
    ba, bb = take(a), take(b)
    assert [x["key"] for x in ba] == [x["key"] for x in bb]
    for x, y in zip(ba, bb):
        assert torch.equal(x["rgb"], y["rgb"]) and torch.equal(x["label"], y["label"])
    # 22 samples in batches of 3: 8 steps, the last one partial (every sample once)
    assert a.stats["batches"] == len(a) == 8  # summary done before the caller's last step
    assert sorted(k for x in ba for k in x["key"]) == sorted(
        f"tiny_{s:03d}_{i:04d}" for s, i in all_ids(corpus)
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_train_batches_are_integer_and_to_float_gives_the_float_batch(tmp_path, workers):
    corpus = make_tiny_corpus(tmp_path, shard_sizes=[5, 4, 6])

    def batches(**kw):
        cfg = _cfg(num_workers=workers, **kw)
        return list(make_train_loader(corpus, cfg, epoch=1, seed=4, world=WorldInfo()))

    ints, floats = batches(), batches(float_on_device=False)
    assert len(ints) == len(floats) == 5
    for bi, bf in zip(ints, floats):
        assert bi["rgb"].dtype == torch.uint8 and bi["depth"].dtype == torch.uint16
        assert bi["label"].dtype == torch.uint8 and bi["gt"].dtype == torch.uint8
        assert bi["rgb"].shape == bf["rgb"].shape == (3, 3, 32, 32)
        assert all(bf[k].dtype == torch.float32 for k in ("rgb", "depth", "label", "gt"))
        conv = to_float(bi, torch.device("cpu"))
        for k in ("rgb", "depth", "label", "gt", "shard", "index", "word", "has_gt"):
            assert torch.equal(conv[k], bf[k]), k
        assert conv["key"] == bf["key"]
        assert to_float(bf)["rgb"] is bf["rgb"]  # a float batch is only moved
    # the converted values are the documented ones
    b = ints[0]
    f = to_float(b)
    torch.testing.assert_close(f["rgb"], b["rgb"].float() / 255, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        f["depth"], b["depth"].to(torch.int32).float() / 65535, rtol=0, atol=1e-7
    )
    assert set(f["gt"].unique().tolist()) <= {0.0, 1.0}


def test_train_workers_decode_only_their_share_of_the_epoch(tmp_path, monkeypatch):
    """No batch is prepared beyond len(loader): each worker stops after its share."""
    corpus = make_tiny_corpus(tmp_path, shard_sizes=[9, 8, 9, 8])
    log_file = tmp_path / "decoded.txt"
    real = decode.SampleDecoder.__call__

    def counting_decode(self, raw):
        with open(log_file, "a") as f:  # forked workers inherit this patch
            f.write(f"{raw['__key__']}\n")
        return real(self, raw)

    monkeypatch.setattr(decode.SampleDecoder, "__call__", counting_decode)
    cfg = _cfg(num_workers=2, batch_size=3, prefetch_factor=2, shuffle_buffer=4)
    loader = make_train_loader(corpus, cfg, epoch=0, seed=0, world=WorldInfo())
    assert len(loader) == 12  # 34 samples: 11 full batches and one of 1
    it = iter(loader)  # the training loop takes exactly len() batches
    got = [next(it) for _ in range(len(loader))]
    assert sum(len(b["key"]) for b in got) == 34
    assert len(log_file.read_text().splitlines()) == 34  # nothing decoded and thrown away


def test_eval_rank_without_shards_gets_nothing(tmp_path):
    corpus = make_tiny_corpus(tmp_path, shard_sizes=[3, 2])
    loader = make_eval_loader(corpus, _cfg(num_workers=2), world=WorldInfo(2, 3))
    assert len(loader) == 0 and list(loader) == [] and loader.stats["missing"] == {}


def test_train_augmentation_keeps_label_on_the_object(tmp_path):
    corpus = make_tiny_corpus(tmp_path, shard_sizes=[8, 8], size=48, label_size=24, labels="gt")
    cfg = _cfg(train_size=40, crop=0.3, rotate_prob=1.0, rotate_deg=20.0)
    for b in make_train_loader(corpus, cfg, epoch=0, seed=3, world=WorldInfo()):
        b = to_float(b)
        label, gt = b["label"][:, 0] > 0.5, b["gt"][:, 0] > 0.5
        inter = (label & gt).sum(dim=(1, 2)).float()
        union = (label | gt).sum(dim=(1, 2)).float().clamp(min=1)
        assert (inter / union).min() > 0.6


def test_workers_are_clamped_to_shards(tmp_path, caplog):
    corpus = make_tiny_corpus(tmp_path, shard_sizes=[4, 3])
    with caplog.at_level(logging.WARNING, logger="jsm_dist.data.stream"):
        loader = make_eval_loader(corpus, _cfg(num_workers=4), world=WorldInfo())
    assert loader.num_workers == 2
    assert "only 2 shards" in caplog.text
    assert sorted(_ids(loader)) == sorted(all_ids(corpus))


def test_train_needs_a_shard_per_rank(tmp_path):
    corpus = make_tiny_corpus(tmp_path, shard_sizes=[4, 0])
    with pytest.raises(ValueError, match="1 non-empty shards for 2 ranks"):
        make_train_loader(corpus, _cfg(), epoch=0, seed=0, world=WorldInfo(0, 2))


def test_labels_follow_the_store_current_generation(tmp_path):
    corpus = make_tiny_corpus(tmp_path, shard_sizes=[3, 2])
    store = LabelStore.open(corpus.label_dir)
    w = store.writer(1, world=WorldInfo())
    for s, n in enumerate(corpus.shard_sizes):
        w.write(s, list(range(n)), np.full((n, 32, 32), 7, np.uint8), None)
    w.close()
    store.commit(1, world=WorldInfo())
    b = next(iter(make_eval_loader(corpus, _cfg(), world=WorldInfo())))
    assert b["label"].mul(255).round().unique().tolist() == [7.0]


def test_corpus_without_text_gives_negative_class(tmp_path):
    corpus = make_tiny_corpus(tmp_path, shard_sizes=[2], with_text=False, with_gt=True)
    b = next(iter(make_eval_loader(corpus, _cfg(), world=WorldInfo())))
    assert b["word"].tolist() == [0, 0] and b["caption"] == ["", ""]


# ---- corrupt data -------------------------------------------------------------------------
def _drop_member(path, name: str) -> None:
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.name != name]
    with tarfile.open(path, "w") as tar:
        import io

        for m, data in members:
            tar.addfile(m, io.BytesIO(data))


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_member_is_skipped_counted_and_reported(tmp_path, workers, caplog):
    corpus = make_tiny_corpus(tmp_path, shard_sizes=[4, 5, 3])
    garble_member(corpus.shard_paths[1], "tiny_001_0002.rgb.png")
    _drop_member(corpus.shard_paths[2], "tiny_002_0000.depth.png")
    with caplog.at_level(logging.WARNING, logger="jsm_dist.data.stream"):
        loader = make_eval_loader(corpus, _cfg(num_workers=workers), world=WorldInfo())
        ids = _ids(list(loader))
    lost = {(1, 2), (2, 0)}
    assert sorted(ids) == sorted(all_ids(corpus) - lost)
    assert loader.stats["skipped"] == 2
    assert loader.stats["reasons"] == {"undecodable rgb": 1, "missing member depth.png": 1}
    assert loader.stats["missing"] == {1: 1, 2: 1}
    assert "skipped 2 corrupt samples" in caplog.text  # the epoch-end summary
    train = make_train_loader(corpus, _cfg(num_workers=workers), epoch=0, seed=0, world=WorldInfo())
    n = len(list(train))
    assert n == len(train) and train.stats["skipped"] >= 1  # counters came back from workers


def test_truncated_shard_loses_only_its_tail(tmp_path):
    corpus = make_tiny_corpus(tmp_path, shard_sizes=[4, 6, 3])
    path = corpus.shard_paths[1]
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    loader = make_eval_loader(corpus, _cfg(num_workers=2), world=WorldInfo())
    ids = _ids(list(loader))
    assert len(ids) == len(set(ids))
    others = {x for x in all_ids(corpus) if x[0] != 1}
    assert others <= set(ids)
    got_from_1 = [x for x in ids if x[0] == 1]
    assert 0 < len(got_from_1) < 6
    assert loader.stats["missing"] == {1: 6 - len(got_from_1)}
    assert loader.stats["shard_errors"] + loader.stats["skipped"] >= 1


# ---- config and splitting -------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, bad",
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"crop": 1.5}, "1.5"),
        ({"num_workers": -1}, "num_workers=-1"),
    ],
)
def test_data_config_rejects_bad_values(kw, bad):
    with pytest.raises(ValueError, match=bad):
        DataConfig(**kw)


def test_balanced_split_is_deterministic_and_complete():
    sizes = [50, 3, 3, 20, 7, 7, 1, 9]
    groups = balanced_split(list(range(8)), sizes, 3, seed=11)
    assert groups == balanced_split(list(range(8)), sizes, 3, seed=11)
    assert Counter(s for g in groups for s in g) == Counter(range(8))
    loads = sorted(sum(sizes[s] for s in g) for g in groups)
    assert loads[-1] == 50  # the big shard alone; the rest spread over the other two
    assert abs(loads[0] - loads[1]) <= 9


def test_compact_batch_round_trip_with_and_without_a_shared_slot():
    import multiprocessing

    from jsm_dist.data.batching import SharedBatchRing, collate, expand_batch

    rng = np.random.default_rng(0)
    samples = []
    for i in range(3):
        samples.append(
            {
                "rgb": rng.integers(0, 256, (16, 16, 3)).astype(np.uint8),
                "depth": rng.random((16, 16), dtype=np.float32),
                "label": rng.integers(0, 256, (16, 16)).astype(np.uint8)
                if i
                else rng.random((16, 16)),
                "gt": (rng.random((16, 16)) > 0.5).astype(np.uint8) if i != 2 else None,
                "shard": i,
                "index": 2 * i,
                "word": 1,
                "word_pos": 0,
                "key": f"k{i}",
                "caption": "c",
            }
        )
    plain = expand_batch(collate(samples))
    ring = SharedBatchRing(multiprocessing.get_context("fork"), 1, 2, 4, 16)
    views = ring.views(0, 1)
    slotted = expand_batch(collate(samples, views), source={k: v[:3] for k, v in views.items()})
    for key in ("rgb", "depth", "label", "gt", "has_gt", "shard", "index"):
        assert torch.equal(plain[key], slotted[key]), key
    assert plain["rgb"].shape == (3, 3, 16, 16) and plain["rgb"].dtype == torch.float32
    np.testing.assert_allclose(
        plain["rgb"][1].permute(1, 2, 0).numpy(), samples[1]["rgb"] / 255.0, atol=1e-6
    )
    np.testing.assert_allclose(
        plain["depth"][0, 0].numpy(), samples[0]["depth"], atol=0.5 / 65535 + 1e-7
    )
    np.testing.assert_allclose(
        plain["label"][0, 0].numpy(), samples[0]["label"], atol=0.5 / 255 + 1e-6
    )
    assert plain["has_gt"].tolist() == [True, True, False] and plain["gt"][2].sum() == 0
    assert plain["index"].tolist() == [0, 2, 4] and plain["key"] == ["k0", "k1", "k2"]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_shared_ring_lends_a_slot_until_its_tensors_are_gone(method):
    import gc
    import multiprocessing

    from jsm_dist.data.batching import SharedBatchRing, expand_batch

    ring = SharedBatchRing(multiprocessing.get_context(method), 2, 2, 3, 8)
    assert [ring.take(1), ring.take(1), ring.take(1)] == [0, 1, None]  # all busy: None
    ring.views(1, 1)["depth"][:] = 7
    meta = {"has_gt": [True, False], "word": [0, 1], "shard": [0, 0], "index": [1, 2]}
    meta.update(word_pos=[0, 0], key=["a", "b"], caption=["", ""])
    batch = expand_batch(dict(meta), source=ring.lend(1, 1, 2), to_float32=False, copy=False)
    assert batch["depth"].shape == (2, 1, 8, 8) and (batch["depth"] == 7).all()
    ring.give_back(1, 0)
    assert ring.take(1) == 0 and ring.take(1) is None  # slot 1 is still lent
    part = batch["depth"][1]  # a view of a view keeps the slot lent too
    del batch
    gc.collect()
    assert ring.take(1) is None
    del part
    gc.collect()
    assert ring.take(1) == 1 and ring.busy_slots() == 2  # worker 1: both slots; worker 0: none
    assert ring.take(0) == 0


def test_workers_fall_back_when_the_consumer_keeps_every_batch(tmp_path):
    """A consumer that holds on to all batches (list(loader)) exhausts the shared slots:
    later batches come the DataLoader's own way, and no held batch is ever overwritten."""
    corpus = make_tiny_corpus(tmp_path, shard_sizes=[15, 15])
    cfg = _cfg(num_workers=2, prefetch_factor=1)  # 3 slots per worker, 5 batches per worker
    loader = make_train_loader(corpus, cfg, epoch=0, seed=1, world=WorldInfo())
    held = list(loader)
    assert len(held) == 10 and loader.stats["unslotted"] >= 4
    ref_cfg = _cfg(num_workers=2, prefetch_factor=1, float_on_device=False)
    ref = list(make_train_loader(corpus, ref_cfg, epoch=0, seed=1, world=WorldInfo()))
    for b, r in zip(held, ref):
        assert b["key"] == r["key"]
        assert torch.equal(to_float(b)["rgb"], r["rgb"]) and torch.equal(to_float(b)["gt"], r["gt"])


@pytest.mark.parametrize("workers", [0, 2])
def test_train_loader_without_gt_never_decodes_it(tmp_path, monkeypatch, workers):
    """``read_gt=False`` (training modes that do not train on GT): gt.png is never decoded,
    batches carry zero gt and has_gt False, and everything else is what the loader with
    GT delivers (same samples, same augmentation draws)."""
    corpus = make_tiny_corpus(tmp_path, shard_sizes=[5, 4, 6])
    cfg = _cfg(num_workers=workers)
    with_gt = list(make_train_loader(corpus, cfg, epoch=0, seed=2, world=WorldInfo()))
    assert all(b["has_gt"].all() for b in with_gt) and any(b["gt"].any() for b in with_gt)

    def no_gt_decode(data):  # a decoded GT would make its sample "corrupt", counted below
        raise AssertionError("the ground-truth mask was decoded")

    monkeypatch.setattr(decode, "decode_gray", no_gt_decode)  # forked workers inherit it
    loader = make_train_loader(corpus, cfg, epoch=0, seed=2, world=WorldInfo(), read_gt=False)
    batches = list(loader)
    assert loader.stats["skipped"] == 0 and len(batches) == len(with_gt) == len(loader)
    assert loader.stats["read_gt"] is False
    for a, b in zip(with_gt, batches):
        assert b["key"] == a["key"]
        assert not b["has_gt"].any() and b["has_gt"].shape == a["has_gt"].shape
        assert b["gt"].shape == a["gt"].shape and b["gt"].dtype == a["gt"].dtype
        assert not b["gt"].any()
        for k in ("rgb", "depth", "label"):
            assert torch.equal(a[k], b[k]), k


def test_train_batches_without_gt_are_zero_even_in_reused_memory(tmp_path, monkeypatch):
    """Batches made without a shared slot start from uninitialised memory: without GT the
    loader must zero their gt rows itself (nothing writes them)."""
    from jsm_dist.data import stream

    real = stream.empty_images

    def dirty(*args):
        images = real(*args)
        for v in images.values():
            v.fill(0xAB)  # what recycled memory may hold
        return images

    monkeypatch.setattr(stream, "empty_images", dirty)
    corpus = make_tiny_corpus(tmp_path, shard_sizes=[5, 4])
    loader = make_train_loader(corpus, _cfg(), epoch=0, seed=0, world=WorldInfo(), read_gt=False)
    batches = list(loader)
    assert len(batches) == 3 and not any(b["gt"].any() for b in batches)
    assert all(b["rgb"].ne(0xAB).any() for b in batches)  # the rest was written


def test_decoder_without_gt_neither_decodes_nor_checks_it(tmp_path):
    corpus = make_tiny_corpus(tmp_path, shard_sizes=[2])
    with tarfile.open(corpus.shard_paths[0]) as tar:
        members = {
            m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar if "_0000." in m.name
        }
    raw = {"__key__": "tiny_000_0000", "__url__": corpus.shard_paths[0], **members}
    url_to_shard = {corpus.shard_paths[0]: 0}
    assert decode.SampleDecoder(corpus, None, url_to_shard)(raw)["gt"] is not None
    raw["gt.png"] = raw["gt.png"][:20]  # truncated: corrupt when read
    with pytest.raises(decode.CorruptMember, match="undecodable gt"):
        decode.SampleDecoder(corpus, None, url_to_shard)(raw)
    sample = decode.SampleDecoder(corpus, None, url_to_shard, read_gt=False)(raw)
    assert sample["gt"] is None and sample["rgb"].shape == (32, 32, 3)
