"""The synthetic captioned RGB-D generator: determinism, contract, GT/caption consistency."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest

from jsm_dist.data.synth import (
    CSV_COLUMNS,
    FAMILY,
    MAX_CAPTION_WORDS,
    VOCAB,
    SynthConfig,
    generate,
    main,
    render,
)
from jsm_dist.schema import NEGATIVE_WORD

SIZE = 64


@pytest.fixture(scope="module")
def scenes() -> list[tuple[dict, dict]]:
    cfg = SynthConfig(num_samples=40, image_size=SIZE, seed=3)
    return [render(cfg, i) for i in range(cfg.num_samples)]


def _same(a: dict, b: dict) -> bool:
    return (
        a["key"] == b["key"]
        and a["meta"] == b["meta"]
        and all(np.array_equal(a[k], b[k]) for k in ("rgb", "depth", "gt"))
    )


def test_vocab_has_enough_distinct_words():
    assert len(VOCAB) >= 12
    assert len(set(VOCAB)) == len(VOCAB)
    assert NEGATIVE_WORD not in VOCAB
    assert all(w.isalpha() and w.islower() for w in VOCAB)
    assert set(FAMILY) == set(VOCAB)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"num_samples": -1}, "-1"),
        ({"num_samples": 2, "image_size": 16}, "16"),
        ({"num_samples": 2, "seed": -3}, "-3"),
        ({"num_samples": 2, "max_distractors": 99}, "99"),
        ({"num_samples": 2, "camouflage_prob": 1.5}, "1.5"),
        ({"num_samples": 2, "salient_radius": (0.3, 0.1)}, "0.3"),
        ({"num_samples": 2, "depth_levels": 1}, "1"),
        ({"num_samples": 2, "name_prefix": "a.b"}, "a.b"),
    ],
)
def test_config_rejects_bad_values_and_names_them(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        SynthConfig(**kwargs)


def test_same_seed_and_index_give_identical_samples():
    cfg = SynthConfig(num_samples=6, image_size=SIZE, seed=5)
    for a, b in zip(generate(cfg), generate(cfg)):
        assert _same(a, b)


def test_different_seed_differs():
    a = list(generate(SynthConfig(num_samples=3, image_size=SIZE, seed=1)))
    b = list(generate(SynthConfig(num_samples=3, image_size=SIZE, seed=2)))
    for x, y in zip(a, b):
        assert not np.array_equal(x["rgb"], y["rgb"])
        assert x["key"] != y["key"]


def test_a_range_equals_the_slice_of_the_whole():
    cfg = SynthConfig(num_samples=10, image_size=SIZE, seed=4)
    whole = list(generate(cfg, 0, 10))
    part = list(generate(cfg, 5, 10))
    assert len(part) == 5
    for a, b in zip(part, whole[5:]):
        assert _same(a, b)
    assert len(list(generate(cfg))) == 10
    with pytest.raises(ValueError, match="start=7"):
        list(generate(cfg, 7, 3))


def test_sample_contract_types_and_shapes(scenes):
    keys = set()
    for smp, _ in scenes:
        assert set(smp) == {"key", "rgb", "depth", "gt", "meta"}
        assert smp["rgb"].dtype == np.uint8 and smp["rgb"].shape == (SIZE, SIZE, 3)
        assert smp["depth"].dtype == np.uint16 and smp["depth"].shape == (SIZE, SIZE)
        assert smp["gt"].dtype == np.uint8 and smp["gt"].shape == (SIZE, SIZE)
        assert set(np.unique(smp["gt"])) <= {0, 255}
        assert smp["meta"]["source"] == "synthetic"
        assert smp["meta"]["name"] == smp["key"] and "." not in smp["key"]
        keys.add(smp["key"])
    assert len(keys) == len(scenes)


def test_caption_names_the_salient_word_once_at_word_pos(scenes):
    positions = set()
    for smp, info in scenes:
        meta = smp["meta"]
        tokens = meta["caption"].split()
        assert len(tokens) <= MAX_CAPTION_WORDS
        assert tokens[meta["word_pos"]] == meta["word"]
        assert tokens.count(meta["word"]) == 1
        assert meta["word"] in VOCAB and meta["word"] == info["objects"][0]["word"]
        assert meta["tags"][0] == meta["word"]
        assert len(set(meta["tags"])) == len(meta["tags"]) and set(meta["tags"]) <= set(VOCAB)
        assert meta["category"] == FAMILY[meta["word"]]
        positions.add(meta["word_pos"])
    assert len(positions) >= 4, "templates should put the word at varied positions"
    # captions often name the distractors too
    with_d = [s for s, i in scenes if len(i["objects"]) > 1]
    named = [
        s for s in with_d if any(t in s["meta"]["caption"].split() for t in s["meta"]["tags"][1:])
    ]
    assert len(named) >= len(with_d) // 2


def test_gt_covers_the_salient_object(scenes):
    for smp, info in scenes:
        sal = info["objects"][0]
        gt = smp["gt"] > 0
        area = gt.mean()
        assert 0.005 < area < 0.5
        ys, xs = np.nonzero(gt)
        assert abs(xs.mean() - sal["cx"]) < sal["r"] and abs(ys.mean() - sal["cy"]) < sal["r"]
        # the clean disparity inside the GT is the salient object's (plus its relief)
        core = cv2.erode(gt.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
        if core.sum() < 10:
            continue
        clean = info["clean_near"][core].mean()
        assert abs(clean - sal["near"]) <= 0.3 * sal["r"] / SIZE + 0.02
        # the sensor depth agrees with it where it has a measurement
        depth = smp["depth"][core]
        valid = depth > 0
        if valid.sum() >= 10:
            observed = ((depth[valid].astype(np.float64) - 1) / 65534).mean()
            assert abs(observed - info["clean_near"][core][valid].mean()) < 0.03


def test_depth_has_holes_and_they_can_be_switched_off(scenes):
    with_holes = sum((s["depth"] == 0).any() for s, _ in scenes)
    assert with_holes >= 0.9 * len(scenes)
    fractions = [(s["depth"] == 0).mean() for s, _ in scenes]
    assert 0.001 < np.mean(fractions) < 0.3
    quiet = SynthConfig(
        num_samples=5,
        image_size=SIZE,
        edge_hole_prob=0,
        blob_hole_prob=0,
        border_hole_prob=0,
        dark_hole_prob=0,
        dropout=0,
    )
    assert all((s["depth"] > 0).all() for s in generate(quiet))


def test_depth_is_quantised_and_near_is_large(scenes):
    cfg = SynthConfig(num_samples=3, image_size=SIZE, depth_levels=16, seed=9)
    for smp in generate(cfg):
        d = smp["depth"][smp["depth"] > 0].astype(np.float64)
        assert len(np.unique(d)) <= 17
    for smp, _ in scenes:  # the floor at the bottom is nearer than the wall at the top
        d = smp["depth"].astype(np.float64)
        top, bottom = d[:4][d[:4] > 0], d[-4:][d[-4:] > 0]
        assert bottom.mean() > top.mean()


def test_single_cues_fail_on_some_scenes(scenes):
    """Depth-only and colour-only saliency must both pick a distractor sometimes."""
    from benchmarks.initial_quality import colour_only

    nearer, louder, total = 0, 0, 0
    for smp, info in scenes:
        if len(info["objects"]) < 2:
            continue
        total += 1
        label, clean = info["label"], info["clean_near"]
        colour = colour_only(smp["rgb"], clean)
        masks = [label == k for k in range(len(info["objects"]))]
        if not masks[0].any():
            continue
        seen = [m for m in masks[1:] if m.sum() > 5]
        nearer += any(clean[m].mean() > clean[masks[0]].mean() + 0.02 for m in seen)
        louder += any(colour[m].mean() > colour[masks[0]].mean() for m in seen)
    assert total >= 20
    assert 0.1 * total <= nearer <= 0.6 * total  # usually, not always, the nearest
    assert louder >= 0.1 * total


def test_cli_writes_a_caps_folder(tmp_path):
    out = tmp_path / "caps"
    assert (
        main(["--out", str(out), "--num", "4", "--size", "48", "--seed", "2", "--encoding", "gbk"])
        == 0
    )
    with open(out / "CapS.csv", encoding="gbk", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 4
    cfg = SynthConfig(num_samples=4, image_size=48, seed=2)
    for row, smp in zip(rows, generate(cfg)):
        name = smp["key"]
        assert row["Image"] == f"{name}.jpg"
        assert (
            row["Caption"].split()[int(row["Position"])] == row["Semantic"] == smp["meta"]["word"]
        )
        depth = cv2.imread(str(out / "depth" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert depth.dtype == np.uint16 and np.array_equal(depth, smp["depth"])
        gt = cv2.imread(str(out / "GT" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(gt, smp["gt"])
        rgb = cv2.imread(str(out / "RGB" / f"{name}.jpg"))[..., ::-1]
        assert rgb.shape == (48, 48, 3)
        assert np.abs(rgb.astype(int) - smp["rgb"]).mean() < 8  # JPEG, but the same image
