"""Packers: synthetic, CapS-style and benchmark folders; shards, corpus.json, labels, bad input."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jsm_dist import schema
from jsm_dist.data import decode, pack, shard_writer, synth
from jsm_dist.data.corpus import Corpus
from jsm_dist.data.stream import DataConfig, make_eval_loader
from jsm_dist.data.vocab import build_vocab, find_word, normalize_word
from jsm_dist.dist import WorldInfo
from jsm_dist.labels import LabelStore


def _pack_synth(out: Path, *extra: str, n: int = 10, workers: int = 1) -> int:
    return pack.main(
        [
            "synth",
            "--out",
            str(out),
            "--num-samples",
            str(n),
            "--image-size",
            "32",
            "--samples-per-shard",
            "4",
            "--workers",
            str(workers),
            "--no-progress",
            *extra,
        ]
    )


def _members(path: str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_synth_pack_writes_shards_corpus_json_and_generation_0(tmp_path):
    assert _pack_synth(tmp_path / "c") == 0
    corpus = Corpus.load(tmp_path / "c")
    assert corpus.shard_sizes == [4, 4, 2]
    assert corpus.vocab[0] == schema.NEGATIVE_WORD
    assert corpus.vocab == build_vocab(synth.VOCAB) and len(corpus.vocab) >= 13
    assert corpus.image_size == (32, 32) and corpus.label_size == (32, 32)
    assert corpus.has_gt and corpus.has_text and corpus.bad_samples == []
    for info, path in zip(corpus.shards, corpus.shard_paths):
        data = Path(path).read_bytes()
        assert info.sha256 == hashlib.sha256(data).hexdigest() and info.bytes == len(data)
    members = _members(corpus.shard_paths[0])
    cfg = synth.SynthConfig(num_samples=10, image_size=32)
    raw = next(synth.generate(cfg, 0, 1))
    key = raw["key"]
    assert {f"{key}.{ext}" for ext in ("rgb.jpg", "depth.png", "gt.png", "json")} <= set(members)
    meta = json.loads(members[f"{key}.json"])
    assert meta["index"] == 0 and meta["caption"] == raw["meta"]["caption"]
    depth = decode.decode_depth(members[f"{key}.depth.png"])
    assert depth.dtype == np.uint16 and np.array_equal(depth, raw["depth"])  # 16 bits kept
    store = LabelStore.open(corpus.label_dir)
    assert store.generation == 0 and list(store.shard_sizes) == corpus.shard_sizes
    expected = shard_writer.initial_labels([raw["rgb"]], [raw["depth"]], schema.NEAR_IS_LARGE, 32)[
        0
    ]
    np.testing.assert_array_equal(store.read(0, 0), expected)


def test_generation_0_is_pinned_and_survives_pruning(tmp_path):
    assert _pack_synth(tmp_path / "c", n=6) == 0
    corpus = Corpus.load(tmp_path / "c")
    store = LabelStore.open(corpus.label_dir)
    assert 0 in store.pinned
    gen0 = store.read_many([0, 1], [0, 1], generation=0)
    single = WorldInfo()
    for g in (1, 2):
        w = store.writer(g, world=single)
        for s, n in enumerate(corpus.shard_sizes):
            w.write(s, list(range(n)), np.full((n, *corpus.label_size), 17 * g, np.uint8), None)
        w.close()
        store.commit(g, world=single)
    assert store.prune(keep=1) == [1]  # generation 1 goes; 0 is pinned, 2 is current
    store = LabelStore.open(corpus.label_dir)
    assert store.generations == [0, 2] and store.generation == 2
    np.testing.assert_array_equal(store.read_many([0, 1], [0, 1], generation=0), gen0)
    assert (store.read(0, 0) == 34).all()


def test_cli_pack_then_stream_every_sample_once_on_2_ranks_x_2_workers(tmp_path):
    assert _pack_synth(tmp_path / "c", "--samples-per-shard", "3", n=14, workers=2) == 0
    corpus = Corpus.load(tmp_path / "c")
    assert corpus.shard_sizes == [3, 3, 3, 3, 2]  # uneven: rank 0 gets 3 shards, rank 1 two
    cfg = DataConfig(train_size=32, batch_size=4, num_workers=2)
    seen = []
    for rank in range(2):
        for b in make_eval_loader(corpus, cfg, world=WorldInfo(rank, 2)):
            seen += list(zip(b["shard"].tolist(), b["index"].tolist(), b["key"]))
    assert len(seen) == 14 and len({(s, i) for s, i, _ in seen}) == 14
    expected = {
        next(synth.generate(synth.SynthConfig(num_samples=14, image_size=32), i, i + 1))["key"]
        for i in range(14)
    }
    assert {k for _, _, k in seen} == expected


def test_packing_is_deterministic_whatever_the_worker_count(tmp_path):
    assert _pack_synth(tmp_path / "a", workers=1) == 0
    assert _pack_synth(tmp_path / "b", workers=2) == 0
    a, b = Corpus.load(tmp_path / "a"), Corpus.load(tmp_path / "b")
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_shards_are_size_bounded(tmp_path):
    assert _pack_synth(tmp_path / "c", "--max-shard-mb", "0.012", "--samples-per-shard", "10") == 0
    corpus = Corpus.load(tmp_path / "c")
    assert corpus.num_samples == 10 and len(corpus.shards) > 1
    for info in corpus.shards:
        assert info.bytes <= 0.012 * 2**20 or info.count == 1
    ids = [
        (int(b["shard"][j]), int(b["index"][j]))
        for b in make_eval_loader(
            corpus, DataConfig(train_size=32, num_workers=0), world=WorldInfo()
        )
        for j in range(len(b["key"]))
    ]
    assert sorted(ids) == [(s, i) for s, n in enumerate(corpus.shard_sizes) for i in range(n)]


def test_holdout_writes_disjoint_train_and_test_with_one_vocab(tmp_path):
    assert _pack_synth(tmp_path / "c", "--holdout", "0.3", n=10) == 0
    train, test = Corpus.load(tmp_path / "c" / "train"), Corpus.load(tmp_path / "c" / "test")
    assert (train.num_samples, test.num_samples) == (7, 3)
    assert train.vocab == test.vocab

    def keys(c):
        return {
            n[: -len(".json")] for p in c.shard_paths for n in _members(p) if n.endswith(".json")
        }

    assert not keys(train) & keys(test) and len(keys(train) | keys(test)) == 10


def test_existing_corpus_needs_overwrite(tmp_path):
    assert _pack_synth(tmp_path / "c") == 0
    assert _pack_synth(tmp_path / "c") == 2
    assert _pack_synth(tmp_path / "c", "--overwrite") == 0


# ---- folders -----------------------------------------------------------------------------
def _img(path: Path, arr: np.ndarray, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)


def _scene(seed: int, size: int = 32):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 255, (size, size, 3)).astype(np.uint8)
    depth = (1000 + rng.integers(0, 30000, (size, size))).astype(np.uint16)
    gt = np.zeros((size, size), np.uint8)
    gt[8:20, 10:24] = 255
    return rgb, depth, gt


def _write_csv(path: Path, rows: list[list], encoding: str) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        ["Index", "Image", "Caption", "Semantic", "Position", "SubCategory", "Category", "Source"]
    )
    w.writerows(rows)
    path.write_bytes(buf.getvalue().encode(encoding))


def _caps_folder(root: Path) -> None:
    """Three good samples and one of every kind of bad input; GBK-encoded CSV."""
    rows = []
    for i, name in enumerate(
        [
            "good0",
            "good1",
            "good2",
            "trunc",
            "junk",
            "nodepth",
            "size",
            "nan",
            "inf",
            "noword",
            "norow",
        ]
    ):
        rgb, depth, gt = _scene(i)
        _img(root / "RGB" / f"{name}.jpg", rgb, quality=90)
        _img(root / "GT" / f"{name}.png", gt)
        if name == "good1":  # float TIFF depth (metres, far = large values): packable
            _img(root / "depth" / f"{name}.tif", (depth / 1000.0).astype(np.float32))
        elif name == "good2":  # .npy depth
            np.save(root / "depth" / f"{name}.npy", depth.astype(np.float32))
        elif name == "nan":
            d = depth.astype(np.float32)
            d[3, 3] = np.nan
            np.save(root / "depth" / f"{name}.npy", d)
        elif name == "inf":
            d = depth.astype(np.float32)
            d[0, 0] = np.inf
            _img(root / "depth" / f"{name}.tif", d)
        elif name == "size":
            _img(root / "depth" / f"{name}.png", depth[:16, :16])
        elif name != "nodepth":
            _img(root / "depth" / f"{name}.png", depth)
        word = ["dog", "cat", "car"][i % 3]
        caption = (
            f"a small {word} next to a tree" if name != "noword" else "a small thing next to a tree"
        )
        if name != "norow":
            # Position as in the reference file: 1-based here for good0, 0-based elsewhere
            rows.append(
                [
                    i,
                    f"{name}.jpg",
                    caption,
                    word,
                    3 if name == "good0" else 2,
                    "动物",
                    "类别",
                    "合成数据",
                ]
            )
    rows.append([99, "ghost.jpg", "a dog on a sofa", "dog", 1, "", "", ""])
    jpg = (root / "RGB" / "trunc.jpg").read_bytes()
    (root / "RGB" / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    (root / "RGB" / "junk.jpg").write_bytes(b"this is not an image" * 20)
    _write_csv(root / "CapS.csv", rows, "gbk")


def test_caps_folder_packs_good_samples_and_reports_every_bad_one(tmp_path, capsys):
    src = tmp_path / "caps"
    _caps_folder(src)
    rc = pack.main(
        [
            "caps",
            "--input",
            str(src),
            "--out",
            str(tmp_path / "c"),
            "--workers",
            "2",
            "--samples-per-shard",
            "3",
            "--no-progress",
        ]
    )
    assert rc == 0
    corpus = Corpus.load(tmp_path / "c")
    assert corpus.num_samples == 3
    bad = {Path(b["source"]).stem.split(":")[-1]: b["reason"] for b in corpus.bad_samples}
    expected = {
        "trunc": "undecodable rgb",
        "junk": "undecodable rgb",
        "nodepth": "missing depth",
        "size": "size mismatch",
        "nan": "NaN/inf",
        "inf": "NaN/inf",
        "noword": "caption without its salient word",
        "norow": "no CapS.csv row",
        "ghost": "missing rgb file",
    }
    assert set(bad) == set(expected)
    for name, reason in expected.items():
        assert reason in bad[name], (name, bad[name])
    printed = capsys.readouterr().out
    assert "9 bad samples skipped" in printed and "nodepth" in printed
    assert corpus.vocab == ["<negative>", "car", "cat", "dog"]
    batches = list(
        make_eval_loader(corpus, DataConfig(train_size=32, num_workers=0), world=WorldInfo())
    )
    got = {
        k: (c, int(w), int(p))
        for b in batches
        for k, c, w, p in zip(b["key"], b["caption"], b["word"], b["word_pos"])
    }
    assert set(got) == {"good0", "good1", "good2"}
    for caption, word, pos in got.values():
        assert caption.split()[pos] == corpus.vocab[word]  # 1-based Position resolved too
    assert all(bool(b["has_gt"].all()) for b in batches)


def test_caps_csv_utf8_also_reads(tmp_path):
    src = tmp_path / "caps"
    rgb, depth, _ = _scene(0)
    _img(src / "RGB" / "a.jpg", rgb)
    _img(src / "depth" / "a.png", depth)
    _write_csv(src / "CapS.csv", [[0, "a.jpg", "一只 dog", "dog", 1, "", "", "网络"]], "utf-8")
    assert (
        pack.main(["caps", "--input", str(src), "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    )
    corpus = Corpus.load(tmp_path / "c")
    assert corpus.num_samples == 1 and not corpus.has_gt  # GT/ is optional for CapS


def test_benchmark_folder_packs_without_text(tmp_path):
    src = tmp_path / "bench"
    for i in range(4):
        rgb, depth, gt = _scene(i, size=24 + 8 * (i % 2))  # two image sizes
        _img(src / "RGB" / f"img{i}.jpg", rgb)
        _img(src / "depth" / f"img{i}.png", (depth >> 8).astype(np.uint8))  # 8-bit depth
        if i != 3:
            _img(src / "GT" / f"img{i}.png", gt)
    rc = pack.main(
        [
            "benchmark",
            "--input",
            str(src),
            "--out",
            str(tmp_path / "c"),
            "--no-progress",
            "--depth-convention",
            "far_is_large",
        ]
    )
    assert rc == 0
    corpus = Corpus.load(tmp_path / "c")
    assert corpus.num_samples == 3 and not corpus.has_text and corpus.has_gt
    assert corpus.image_size is None and corpus.vocab == ["<negative>"]
    assert corpus.depth_convention == schema.FAR_IS_LARGE
    assert [b["reason"] for b in corpus.bad_samples] == ["missing gt file"]
    b = next(
        iter(make_eval_loader(corpus, DataConfig(train_size=32, num_workers=0), world=WorldInfo()))
    )
    assert b["word"].tolist() == [0, 0, 0] and b["rgb"].shape[-2:] == (32, 32)


def test_nothing_packable_exits_non_zero(tmp_path):
    src = tmp_path / "caps"
    (src / "RGB").mkdir(parents=True)
    (src / "depth").mkdir()
    (src / "RGB" / "x.jpg").write_bytes(b"not a jpeg")
    _img(src / "depth" / "x.png", np.ones((8, 8), np.uint8))
    _write_csv(src / "CapS.csv", [[0, "x.jpg", "a dog", "dog", 1, "", "", ""]], "gbk")
    assert (
        pack.main(["caps", "--input", str(src), "--out", str(tmp_path / "c"), "--no-progress"]) == 1
    )
    assert not (tmp_path / "c" / "corpus.json").exists()


# ---- small pure helpers ----------------------------------------------------------------------
def test_find_word_and_vocab():
    assert find_word("A Dog, on a sofa", "dog") == 1
    assert find_word("a dog on a dog", "dog", position=4) == 4
    assert find_word("a dog on a sofa", "dog", position=2) == 1  # 1-based hint
    assert find_word("a cat", "dog") is None
    assert normalize_word(" Car. ") == "car"
    assert build_vocab(["dog", "Cat", "dog", ""]) == ["<negative>", "cat", "dog"]


@pytest.mark.parametrize(
    "arr, reason",
    [
        (np.array([[np.nan, 1.0]], np.float32), "NaN/inf"),
        (np.array([[-1.0, 1.0]], np.float32), "negative"),
        (np.zeros((4, 4), np.uint16), "no valid pixels"),
        (np.zeros((4, 4, 3), np.uint8), "single-channel"),
        (np.array([[70000, 1]], np.int64), "16-bit range"),
    ],
)
def test_bad_depth_arrays_are_rejected(arr, reason):
    with pytest.raises(decode.BadInput, match=reason):
        decode.to_storable_depth(arr)


def test_float_depth_is_scaled_to_16_bits_keeping_holes():
    d = decode.to_storable_depth(np.array([[0.0, 1.5, 3.0]], np.float32))
    assert d.dtype == np.uint16 and d.tolist() == [[0, 32768, 65535]]


def test_normalize_depth_conventions():
    raw = np.array([[0, 100, 200, 300]], np.uint16)
    np.testing.assert_allclose(decode.normalize_depth(raw, schema.NEAR_IS_LARGE), [[0, 0, 0.5, 1]])
    np.testing.assert_allclose(decode.normalize_depth(raw, schema.FAR_IS_LARGE), [[0, 1, 0.5, 0]])
    assert decode.normalize_depth(np.zeros((2, 2), np.uint8)).max() == 0


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("convention", [schema.NEAR_IS_LARGE, schema.FAR_IS_LARGE])
def test_normalize_depth_u16_is_the_float_normalisation_in_16_bits(dtype, convention):
    rng = np.random.default_rng(7)
    top = np.iinfo(dtype).max
    for lo, hi in [(1, top), (3, 40), (top // 3, top // 2), (9, 10)]:
        raw = rng.integers(lo, hi + 1, (23, 31)).astype(dtype)
        raw[rng.random(raw.shape) < 0.15] = 0  # holes
        got = decode.normalize_depth_u16(raw, convention)
        slow = np.round(decode.normalize_depth(raw, convention).astype(np.float64) * 65535)
        assert got.dtype == np.uint16 and got.shape == raw.shape
        assert np.abs(got.astype(np.float64) - slow).max() <= 1.0
        assert (got[raw == 0] == 0).all()
    const = np.array([[0, 7, 7]], dtype)
    assert decode.normalize_depth_u16(const, convention).tolist() == [[0, 32768, 32768]]
    assert not decode.normalize_depth_u16(np.zeros((2, 3), dtype), convention).any()


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def test_opencv_decoding_equals_pil_and_keeps_its_checks():
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (21, 34, 3)).astype(np.uint8)
    jpg = decode.encode_jpeg(rgb)
    np.testing.assert_array_equal(decode.decode_rgb(jpg), np.asarray(Image.open(io.BytesIO(jpg))))
    np.testing.assert_array_equal(decode.decode_rgb(decode.encode_png(rgb)), rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": neither PIL nor the packer's size checks apply it
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", exif=exif)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        np.testing.assert_array_equal(decode.decode_rgb(buf.getvalue()), np.asarray(im))
    grey = decode.encode_jpeg(np.repeat(rgb[..., :1], 3, -1))
    assert decode.decode_rgb(grey).shape == (21, 34, 3)
    d16 = rng.integers(0, 65536, (21, 34)).astype(np.uint16)
    out = decode.decode_depth(decode.encode_png(d16))
    assert out.dtype == np.uint16 and np.array_equal(out, d16)  # 16 bits kept
    d8 = rng.integers(0, 256, (21, 34)).astype(np.uint8)
    assert decode.decode_depth(decode.encode_png(d8)).dtype == np.uint8
    # an RGB-encoded depth map takes PIL's conversion to grey, as before
    np.testing.assert_array_equal(
        decode.decode_depth(_png(rgb)), np.asarray(Image.fromarray(rgb).convert("L"))
    )
    np.testing.assert_array_equal(decode.decode_gray(decode.encode_png(d8)), d8)
    # corrupt data still raises: truncated JPEG (no EOI marker: PIL decodes it, strictly),
    # truncated or garbled PNG
    for bad, fn in [
        (jpg[: len(jpg) // 2], decode.decode_rgb),
        (decode.encode_png(d16)[:-30], decode.decode_depth),
        (decode.encode_png(d8)[:40] + b"\x00garbage" * 20, decode.decode_gray),
    ]:
        with pytest.raises(Exception):  # noqa: B017 - PIL and OpenCV raise different types
            fn(bad)
