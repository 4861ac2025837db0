"""Ground-truth masks stored as 0/1, palette, 1-bit, 16-bit or soft 8-bit are read as
0..255 by every GT reader, so metrics do not depend on how a benchmark stored its masks."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jsm_dist.data import decode
from jsm_dist.data.decode import BadInput
from jsm_dist.data.masks import mask_from_array, read_mask
from jsm_dist.eval import evaluate as ev
from jsm_dist.eval import metrics as M
from jsm_dist.labels import LabelStore
from jsm_dist.labels.tools import load_gt

HW = (24, 32)


def _masks() -> dict[str, np.ndarray]:
    """Binary test masks (bool): two with an object, one without."""
    a = np.zeros(HW, bool)
    a[5:15, 8:20] = True
    b = np.zeros(HW, bool)
    b[10:22, 2:9] = True
    b[3:6, 25:30] = True
    return {"a": a, "b": b, "empty": np.zeros(HW, bool)}


def _palette(mask: np.ndarray, colours: list[tuple[int, int, int]]) -> Image.Image:
    im = Image.fromarray(mask.astype(np.uint8), "P")
    im.putpalette([v for c in colours for v in c] + [0, 0, 0] * (256 - len(colours)))
    return im


# how a benchmark may store the same binary mask
STORAGES = {
    "0/255": lambda m: Image.fromarray(m.astype(np.uint8) * 255),
    "0/1": lambda m: Image.fromarray(m.astype(np.uint8)),
    "1-bit": lambda m: Image.fromarray(m),
    "16-bit 0/65535": lambda m: Image.fromarray(m.astype(np.uint16) * 65535),
    "16-bit 0/1": lambda m: Image.fromarray(m.astype(np.uint16)),
    "palette black/white": lambda m: _palette(m, [(0, 0, 0), (255, 255, 255)]),
    "palette black/red": lambda m: _palette(m, [(0, 0, 0), (128, 0, 0)]),  # VOC-style
    "palette grey 0/1": lambda m: _palette(m, [(0, 0, 0), (1, 1, 1)]),
    "palette white/black": lambda m: _palette(~m, [(255, 255, 255), (0, 0, 0)]),
    # index 0 is the coloured object: the brighter colour is the object, whatever its index
    "palette red/black": lambda m: _palette(~m, [(200, 30, 30), (0, 0, 0)]),
    "RGB 0/1": lambda m: Image.fromarray(np.repeat(m[..., None], 3, -1).astype(np.uint8)),
}


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _folders(root: Path, storage: str) -> tuple[Path, Path]:
    """gt/<name>.png in ``storage``, and one fixed prediction per mask."""
    rng = np.random.default_rng(0)
    gt, pred = root / "gt", root / "pred"
    gt.mkdir(parents=True)
    pred.mkdir(parents=True)
    for name, m in _masks().items():
        STORAGES[storage](m).save(gt / f"{name}.png")
        noisy = np.clip(m * 180.0 + rng.normal(40, 30, HW), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(pred / f"{name}.png")
    return gt, pred


@pytest.mark.parametrize("storage", [s for s in STORAGES if s != "0/255"])
def test_every_storage_gives_the_metrics_of_the_0_255_mask(tmp_path, storage):
    gt, pred = _folders(tmp_path / "ref", "0/255")
    ref = ev.evaluate_folder(pred, gt)
    gt, pred = _folders(tmp_path / "x", storage)
    got = ev.evaluate_folder(pred, gt)
    assert got["num_images"] == ref["num_images"] == 3
    assert ref["maxF"] > 0.5  # the reference itself is a meaningful score
    for k in M.METRIC_KEYS:
        assert got[k] == ref[k], (storage, k)
    assert got["issues"] == ref["issues"] == {}


def test_jsm_eval_main_on_a_0_1_benchmark(tmp_path):
    """The end-to-end command: a 0/1 GT folder scores as its 0/255 copy, not maxF 0."""
    results = {}
    for storage in ("0/255", "0/1"):
        root = tmp_path / storage.replace("/", "_")
        gt, pred = _folders(root / "in", storage)
        bench, methods = root / "gt" / "NLPR", root / "preds" / "M" / "NLPR"
        bench.mkdir(parents=True)
        gt.rename(bench / "GT")
        methods.parent.mkdir(parents=True)
        pred.rename(methods)
        assert ev.main(["--gt-root", str(root / "gt"), "--pred-root", str(root / "preds"),
                        "--out", str(root / "report"), "--workers", "1"]) == 0  # fmt: skip
        results[storage] = json.loads((root / "report" / "results.json").read_text())
    a, b = (r["results"]["M"]["NLPR"] for r in results.values())
    assert a["maxF"] > 0.5 and {k: b[k] for k in M.METRIC_KEYS} == {k: a[k] for k in M.METRIC_KEYS}


def test_all_zero_gt_is_still_an_image_without_object(tmp_path):
    pred = np.full(HW, 90, np.uint8)
    expected = M.evaluate_pairs([(pred, np.zeros(HW, np.uint8))])
    for storage in ("0/255", "0/1", "palette black/white", "16-bit 0/65535"):
        d = tmp_path / storage.replace("/", "_")
        (d / "gt").mkdir(parents=True)
        (d / "pred").mkdir()
        STORAGES[storage](np.zeros(HW, bool)).save(d / "gt" / "z.png")
        Image.fromarray(pred).save(d / "pred" / "z.png")
        got = ev.evaluate_folder(d / "pred", d / "gt")
        assert got["num_images"] == 1 and got["issues"] == {}
        for k in M.METRIC_KEYS:
            assert got[k] == expected[k], (storage, k)


def test_soft_and_16_bit_gt_keep_their_values():
    yy, xx = np.mgrid[0 : HW[0], 0 : HW[1]]
    soft = np.clip((12 - np.hypot(yy - 12, xx - 16)) * 64, 0, 255).astype(np.uint8)  # anti-aliased
    assert 0 < np.count_nonzero((soft > 0) & (soft < 255))
    np.testing.assert_array_equal(read_mask(_png_bytes(Image.fromarray(soft))), soft)
    soft16 = soft.astype(np.uint16) * 257
    np.testing.assert_array_equal(read_mask(_png_bytes(Image.fromarray(soft16))), soft)
    np.testing.assert_array_equal(decode.decode_gray(_png_bytes(Image.fromarray(soft16))), soft)
    # arrays handed to the metric API are read by the same rules
    assert mask_from_array(soft.astype(np.float32) / 255).tolist() == soft.tolist()
    assert mask_from_array(soft).base is None or mask_from_array(soft) is soft  # no copy


@pytest.mark.parametrize("storage", list(STORAGES))
def test_every_gt_reader_agrees(tmp_path, storage):
    """jsm-eval's reader, the packer, the loader's decoder, jsm-labels diff --gt-dir and
    the in-memory metric API read one mask the same way."""
    m = _masks()["a"]
    want = m.astype(np.uint8) * 255
    data = _png_bytes(STORAGES[storage](m))
    (tmp_path / "a.png").write_bytes(data)
    np.testing.assert_array_equal(read_mask(tmp_path / "a.png"), want)
    np.testing.assert_array_equal(decode.load_gray_file(tmp_path / "a.png"), want)
    np.testing.assert_array_equal(decode.decode_gray(data), want)
    store = LabelStore.create(tmp_path / "labels", [1], HW, keys=[["a"]])
    np.testing.assert_array_equal(load_gt(store, 0, tmp_path)[0], want)
    pred = (np.random.default_rng(1).random(HW) * 255).astype(np.uint8)
    as_stored = np.asarray(STORAGES[storage](m)) if storage.startswith(("0/1", "16")) else want
    got, ref = (M.evaluate_arrays(pred[None], g[None]) for g in (as_stored, want))
    assert {k: got[k] for k in M.METRIC_KEYS} == {k: ref[k] for k in M.METRIC_KEYS}


def test_a_palette_mask_that_needs_a_guess_is_refused(tmp_path):
    """Three colours, not grey: which one is the object cannot be told -> a clear error
    (not evaluated, listed with the reason; a BadInput for the packer)."""
    m = np.zeros(HW, np.uint8)
    m[2:10, 2:10], m[12:20, 12:30] = 1, 2
    im = Image.fromarray(m, "P")
    im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0, 0, 0] * 253)
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    im.save(tmp_path / "gt" / "x.png")
    Image.fromarray(m * 100).save(tmp_path / "pred" / "x.png")
    res = ev.evaluate_folder(tmp_path / "pred", tmp_path / "gt")
    assert res["num_images"] == 0 and res["issues"]["unreadable"] == ["x.png"]
    with pytest.raises(BadInput, match="palette image with 3 used colours"):
        decode.load_gray_file(tmp_path / "gt" / "x.png")
    with pytest.raises(ValueError, match="8-bit greyscale"):
        read_mask(tmp_path / "gt" / "x.png")
