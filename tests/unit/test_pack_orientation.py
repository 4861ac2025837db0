"""jsm-pack --depth-convention auto: per-sample decisions in the json, counts and warnings in
corpus.json and the summary, labels and decoded depth oriented per sample."""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jsm_dist import schema
from jsm_dist.data import decode, orientation, pack, shard_writer, synth
from jsm_dist.data.corpus import Corpus, ShardInfo
from jsm_dist.labels import LabelStore

REAL = Path(__file__).resolve().parents[1] / "data" / "real"
NEAR, FAR = schema.NEAR_IS_LARGE, schema.FAR_IS_LARGE
# (source, name, orientation of the stored depth): confident decisions on real samples
PICKED = [
    ("DES", "RGBD_data_1", FAR),
    ("DES", "RGBD_data_3", FAR),
    ("DUT-RGBD", "0124", NEAR),
    ("DUT-RGBD", "0162", NEAR),
]


def _file(folder: Path, stem: str) -> Path:
    return next(p for p in folder.iterdir() if p.stem == stem)


def _mixed_folder(root: Path) -> dict[str, str]:
    """A benchmark folder mixing both orientations: real samples as shipped, plus a flipped
    copy of each. -> {sample name: orientation of its stored depth}."""
    expected = {}
    for src, stem, convention in PICKED:
        base = REAL / src
        for flipped in (False, True):
            name = f"{src}_{stem}" + ("_flipped" if flipped else "")
            (root / "RGB").mkdir(parents=True, exist_ok=True)
            (root / "depth").mkdir(exist_ok=True)
            (root / "GT").mkdir(exist_ok=True)
            rgb = _file(base / "RGB", stem)
            shutil.copy(rgb, root / "RGB" / f"{name}{rgb.suffix}")
            shutil.copy(_file(base / "GT", stem), root / "GT" / f"{name}.png")
            depth = decode.load_depth_file(_file(base / "depth", stem))
            if flipped:
                depth = orientation.flip_depth(depth)
            Image.fromarray(depth).save(root / "depth" / f"{name}.png")
            other = FAR if convention == NEAR else NEAR
            expected[name] = other if flipped else convention
    return expected


def _samples(corpus: Corpus) -> list[dict]:
    """Every shard sample's members, with its shard number and url."""
    out = []
    for shard, url in enumerate(corpus.shard_paths):
        groups: dict[str, dict] = {}
        with tarfile.open(url) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                groups.setdefault(key, {"__key__": key, "__url__": url, "shard": shard})
                groups[key][ext] = tar.extractfile(m).read()
        out += groups.values()
    return out


def _pack(src: Path, out: Path, *extra: str) -> int:
    args = ["benchmark", "--input", str(src), "--out", str(out), "--no-progress"]
    return pack.main([*args, "--samples-per-shard", "3", "--workers", "1", *extra])


def test_mixed_folder_gets_per_sample_orientation_labels_and_decoded_depth(
    tmp_path, caplog, capsys
):
    expected = _mixed_folder(tmp_path / "bench")
    with caplog.at_level(logging.WARNING):
        assert _pack(tmp_path / "bench", tmp_path / "c") == 0
    corpus = Corpus.load(tmp_path / "c")
    n = len(expected)
    assert corpus.num_samples == n
    stats = corpus.depth_orientation
    assert stats["mode"] == schema.DEPTH_AUTO
    assert (stats["near_is_large"], stats["far_is_large"], stats["uncertain"]) == (4, 4, 0)
    assert (stats["gt_checked"], stats["gt_agree"], stats["gt_disagree_samples"]) == (n, n, [])
    assert corpus.depth_convention == NEAR  # majority; a tie goes to near_is_large
    assert "mixes depth orientations" in caplog.text
    out = capsys.readouterr().out
    assert "depth orientation (auto): 4 near_is_large, 4 far_is_large, 0 uncertain" in out
    assert "agrees with the GT on 8/8 (100.0%)" in out and "warning: the corpus mixes" in out

    store = LabelStore.open(corpus.label_dir)
    decoder = decode.SampleDecoder(corpus, store, {u: i for i, u in enumerate(corpus.shard_paths)})
    seen = set()
    for raw in _samples(corpus):
        meta = json.loads(raw["json"])
        name = meta["name"]
        seen.add(name)
        assert meta["depth_convention"] == expected[name], name
        score = meta["depth_orientation"]["score"]
        assert (score > 0) == (expected[name] == NEAR) and not meta["depth_orientation"][
            "uncertain"
        ]
        stored = decode.decode_depth(raw["depth.png"])
        gt = decode.decode_gray(raw["gt.png"])
        rgb = decode.decode_rgb(raw["rgb.jpg"])
        sample = decoder(raw)
        # decoded depth: near = large for every sample, whatever its stored orientation
        np.testing.assert_array_equal(
            sample["depth"], decode.normalize_depth_u16(stored, expected[name])
        )
        assert orientation.gt_implied(sample["depth"], gt) == NEAR, name
        # generation-0 labels come from the per-sample orientation too
        label = shard_writer.initial_labels(
            [rgb], [stored], [expected[name]], corpus.label_size[0]
        )[0]
        np.testing.assert_array_equal(store.read(raw["shard"], meta["index"]), label)
    assert seen == set(expected)


def test_explicit_convention_applies_to_every_sample_and_gt_disagreement_is_reported(
    tmp_path, caplog
):
    expected = _mixed_folder(tmp_path / "bench")
    with caplog.at_level(logging.WARNING):
        assert _pack(tmp_path / "bench", tmp_path / "c", "--depth-convention", FAR) == 0
    corpus = Corpus.load(tmp_path / "c")
    stats = corpus.depth_orientation
    assert corpus.depth_convention == FAR and stats["mode"] == FAR
    assert (stats["near_is_large"], stats["far_is_large"], stats["uncertain"]) == (0, 8, 0)
    assert sorted(stats["gt_disagree_samples"]) == sorted(
        k for k, v in expected.items() if v == NEAR
    )
    assert "contradicts" in caplog.text and "mixes" not in caplog.text
    for raw in _samples(corpus):
        meta = json.loads(raw["json"])
        assert meta["depth_convention"] == FAR and "depth_orientation" not in meta


def test_synthetic_demo_corpus_is_near_is_large_on_every_sample_and_labels_unchanged(tmp_path):
    out = tmp_path / "demo"
    args = ["synth", "--out", str(out), "--num-samples", "64", "--image-size", "128"]
    assert pack.main([*args, "--seed", "0", "--samples-per-shard", "64", "--no-progress"]) == 0
    corpus = Corpus.load(out)
    stats = corpus.depth_orientation
    assert (stats["near_is_large"], stats["far_is_large"], stats["uncertain"]) == (64, 0, 0)
    assert stats["gt_agree"] == stats["gt_checked"] == 64
    for raw in _samples(corpus):
        assert json.loads(raw["json"])["depth_convention"] == NEAR
    # what the packer wrote before per-sample orientation: one near_is_large for all
    scenes = list(synth.generate(synth.SynthConfig(num_samples=64, image_size=128, seed=0)))
    before = shard_writer.initial_labels(
        [s["rgb"] for s in scenes], [s["depth"] for s in scenes], NEAR, 128
    )
    store = LabelStore.open(corpus.label_dir)
    np.testing.assert_array_equal(store.read_many([0] * 64, list(range(64))), before)


def _raw_member(meta: dict, depth: np.ndarray) -> dict:
    png = decode.encode_png(depth)
    rgb = decode.encode_png(np.zeros((*depth.shape, 3), np.uint8))
    return {
        "__url__": "u",
        "__key__": "k",
        "json": json.dumps(meta),
        "depth.png": png,
        "rgb.png": rgb,
    }


def test_decoder_uses_the_sample_field_and_falls_back_to_the_corpus(tmp_path):
    corpus = Corpus(
        root=tmp_path,
        name="old",
        vocab=[schema.NEGATIVE_WORD],
        shards=[ShardInfo("x.tar", 1)],
        label_size=(4, 4),
        depth_convention=FAR,
        has_text=False,
    )
    dec = decode.SampleDecoder(corpus, None, {"u": 0}, read_gt=False)
    depth = np.array([[0, 10, 20], [30, 40, 50]], np.uint16)
    old = dec(_raw_member({"index": 0}, depth))  # packed before per-sample orientation
    np.testing.assert_array_equal(old["depth"], decode.normalize_depth_u16(depth, FAR))
    new = dec(_raw_member({"index": 0, "depth_convention": NEAR}, depth))
    np.testing.assert_array_equal(new["depth"], decode.normalize_depth_u16(depth, NEAR))
    with pytest.raises(decode.CorruptMember, match="bad depth_convention"):
        dec(_raw_member({"index": 0, "depth_convention": "disparity"}, depth))
