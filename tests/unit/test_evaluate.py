"""Evaluation: metric values on hand-made masks, bad inputs, report files."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from jsm_dist.eval import evaluate as ev
from jsm_dist.eval import inputs as I
from jsm_dist.eval import metrics as M
from jsm_dist.eval import report


def _one(pred, gt) -> dict:
    return M.evaluate_pairs([(np.asarray(pred, np.uint8), np.asarray(gt, np.uint8))])


# ---------------------------------------------------------------- metric values by hand
def test_mae_by_hand():
    # pred contains 0 and 255, so the toolbox min-max normalisation leaves it unchanged.
    pred = [[0, 255, 51, 0], [255, 255, 0, 102]]
    gt = [[0, 255, 255, 0], [255, 0, 0, 0]]
    # |errors| = 0, 0, 1 - 0.2, 0 | 0, 1, 0, 0.4  -> 2.2 / 8
    assert _one(pred, gt)["MAE"] == pytest.approx(0.275, abs=1e-12)


def test_prediction_is_min_max_normalised_like_the_toolboxes():
    # 0..51 is stretched to 0..1, so a dim but correct map scores MAE 0.
    assert _one([[0, 51], [51, 0]], [[0, 255], [255, 0]])["MAE"] == pytest.approx(0.0)


def test_smeasure_of_perfect_prediction_is_one():
    gt = np.zeros((12, 16), np.uint8)
    gt[3:8, 4:11] = 255
    assert _one(gt, gt)["Sm"] == pytest.approx(1.0, abs=1e-9)


def test_smeasure_of_all_zero_prediction_closed_form():
    # With pred == 0 everywhere, S = a*So + (1-a)*Sr, a = 0.5:
    #  So = mu*O(fg) + (1-mu)*O(bg): O(fg) = 2*0/(0+1+0) = 0, and on the background 1-pred = 1
    #       (mean 1, std 0) gives O(bg) = 2*1/(1+1+0) = 1, so So = 1 - mu (mu = fg fraction).
    #  Sr = sum of quadrant weights * ssim(0, gt_q); with x = 0 the ssim numerator is 0, so a
    #       quadrant scores 1 when its GT is constant (beta = 0) and 0 when mixed.
    # (a) centred 4x4 block in 8x8: every quadrant around the centroid is mixed -> Sr = 0.
    gt = np.zeros((8, 8), np.uint8)
    gt[2:6, 2:6] = 255
    mu = 16 / 64
    assert _one(np.zeros_like(gt), gt)["Sm"] == pytest.approx(0.5 * (1 - mu), abs=1e-9)
    # (b) 4x4 block in the corner of 10x10: centroid (1.5, 1.5) rounds to 2, +1 (MATLAB's
    #     1-based split) -> the top-left quadrant is rows/cols 0..2, all foreground, weight
    #     3*3/100; the other three quadrants are mixed.
    gt = np.zeros((10, 10), np.uint8)
    gt[:4, :4] = 255
    expected = 0.5 * (1 - 16 / 100) + 0.5 * (9 / 100)
    assert _one(np.zeros_like(gt), gt)["Sm"] == pytest.approx(expected, abs=1e-9)
    # (c) empty GT: S = 1 - mean(pred) (pred 0..255 normalised: half the pixels are 1)
    assert _one([[0, 255], [255, 0]], np.zeros((2, 2)))["Sm"] == pytest.approx(0.5)


def test_fmeasure_at_threshold_by_hand():
    pred = [[0, 200, 255, 100], [130, 128, 20, 255]]
    gt = [[0, 255, 255, 255], [0, 0, 0, 255]]
    res = _one(pred, gt)
    curves = res["curves"]

    def f(p, r, b2=0.3):
        return (1 + b2) * p * r / (b2 * p + r)

    # t = 128: predicted positives 200, 255, 130, 128, 255 -> TP 3 of 5; GT has 4 positives.
    assert curves["precision"][128] == pytest.approx(3 / 5)
    assert curves["recall"][128] == pytest.approx(3 / 4)
    assert curves["fmeasure"][128] == pytest.approx(f(3 / 5, 3 / 4))
    # t = 129 drops the 128 pixel (a false positive)
    assert curves["fmeasure"][129] == pytest.approx(f(3 / 4, 3 / 4))
    # t = 201: only the two 255s, both true -> P = 1, R = 1/2
    assert curves["fmeasure"][201] == pytest.approx(f(1.0, 0.5))
    assert res["maxF"] == pytest.approx(max(curves["fmeasure"]))
    assert res["meanF"] == pytest.approx(np.mean(curves["fmeasure"]))
    # adaptive threshold = 2 * mean(pred/255) = 2 * 1088/255/8 > 1 -> clipped to 1: the 255s
    assert res["adpF"] == pytest.approx(f(1.0, 0.5))


def test_emeasure_of_a_perfect_binary_map():
    gt = np.zeros((6, 9), np.uint8)
    gt[1:4, 2:7] = 255
    # every pixel aligned: enhanced alignment 1 per pixel, sum N over (N - 1)
    n = gt.size
    assert _one(gt, gt)["maxE"] == pytest.approx(n / (n - 1))


def test_float_inputs_match_uint8_and_arrays_resize():
    rng = np.random.default_rng(0)
    gts = (rng.random((3, 16, 20)) > 0.6).astype(np.uint8) * 255
    preds = rng.random((3, 16, 20))
    a = M.evaluate_arrays(preds, gts)
    b = M.evaluate_pairs(zip(np.rint(preds * 255).astype(np.uint8), gts))
    assert {k: a[k] for k in M.METRIC_KEYS} == {k: b[k] for k in M.METRIC_KEYS}
    # label-store generations are stored smaller than the GT: resized to the GT size
    small = np.rint(preds[:, ::2, ::2] * 255).astype(np.uint8)
    c = M.evaluate_arrays(small, gts)
    d = M.evaluate_pairs((M.resize_to(p, (16, 20)), g) for p, g in zip(small, gts))
    assert c["MAE"] == d["MAE"] and c["num_images"] == 3


@pytest.mark.parametrize(
    ("pred", "gt", "needle"),
    [
        (np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8), "(4, 4)"),
        (np.zeros((2, 4, 4), np.uint8), np.zeros((4, 4), np.uint8), "(2, 4, 4)"),
        (np.full((4, 4), 1.5), np.zeros((4, 4), np.uint8), "1.5"),
    ],
)
def test_bad_pairs_name_the_bad_value(pred, gt, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        M.evaluate_pairs([(pred, gt)])


def test_empty_accumulator_raises():
    with pytest.raises(ValueError, match="no images"):
        M.SODMetrics().get_results()


def test_agrees_with_reference_style_evaluator():
    from benchmarks.evaluate import ReferenceStyleEvaluator, synthetic_pairs

    pairs = synthetic_pairs(3, 96, seed=1)
    ours, ref = M.evaluate_pairs(pairs), ReferenceStyleEvaluator(pairs).run()
    assert ours["MAE"] == pytest.approx(ref["MAE"], abs=1e-5)
    # the reference splits the regions at the centroid without MATLAB's +1 (PySODMetrics
    # keeps it): a small difference that shrinks with the image size
    assert ours["Sm"] == pytest.approx(ref["Sm"], abs=2e-3)
    assert ours["maxF"] == pytest.approx(ref["maxF"], abs=2e-2)  # 255 vs 256 thresholds


# ---------------------------------------------------------------- folders, bad input, report
def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)


@pytest.fixture
def bench_tree(tmp_path):
    """gt/NJUD (alias of NJU2K) with good, non-binary, unmatched and broken files;
    gt/NLPR with an empty GT folder; methods M1 (full) and M2 (no NJU2K folder)."""
    rng = np.random.default_rng(3)
    gt_a = np.zeros((24, 32), np.uint8)
    gt_a[5:15, 8:20] = 255
    gt_b = np.zeros((20, 20), np.uint8)
    gt_b[4:12, 4:12] = 200  # non-binary: 200 > 128 -> foreground
    gt_b[12:14, 4:12] = 100  # -> background
    pred_a = (rng.random((24, 32)) * 255).astype(np.uint8)
    pred_b = (rng.random((10, 10)) * 255).astype(np.uint8)  # half the GT size
    gt, preds = tmp_path / "gt", tmp_path / "preds"
    _png(gt / "NJUD" / "GT" / "a.png", gt_a)
    _png(gt / "NJUD" / "GT" / "b.png", gt_b)
    _png(gt / "NJUD" / "GT" / "c.png", gt_a)  # no prediction
    _png(gt / "NJUD" / "GT" / "e.png", gt_a)
    (gt / "NLPR" / "GT").mkdir(parents=True)
    _png(preds / "M1" / "NJU2K" / "a.png", pred_a)
    _png(preds / "M1" / "NJU2K" / "b.png", pred_b)
    _png(preds / "M1" / "NJU2K" / "d.png", pred_a)  # no ground truth
    (preds / "M1" / "NJU2K" / "e.png").write_bytes(b"not a png")
    (preds / "M2" / "NLPR").mkdir(parents=True)
    expected = M.evaluate_pairs([(pred_a, gt_a), (M.resize_to(pred_b, gt_b.shape), gt_b)])
    return tmp_path, expected


def test_folder_bad_inputs_are_counted_and_reported(bench_tree, capsys, caplog):
    root, expected = bench_tree
    out = root / "report"
    with caplog.at_level(logging.WARNING):
        rc = ev.main(["--gt-root", str(root / "gt"), "--pred-root", str(root / "preds"),
                      "--out", str(out), "--workers", "1"])  # fmt: skip
    assert rc == 0
    data = json.loads((out / "results.json").read_text())["results"]
    m1 = data["M1"]["NJU2K"]
    assert m1["num_images"] == 2
    for k in M.METRIC_KEYS:
        assert m1[k] == pytest.approx(expected[k], abs=1e-12), k
    assert m1["issues"] == {
        "missing_gt": ["d.png"],
        "missing_pred": ["c.png"],
        "nonbinary_gt": ["b.png"],
        "resized": ["b.png"],
        "unreadable": ["e.png"],
    }
    assert data["M1"]["NLPR"]["num_images"] == 0 and "empty" in data["M1"]["NLPR"]["issues"]
    assert data["M2"]["NJU2K"]["issues"]["missing_dataset"] == ["M2/NJU2K"]
    assert data["M2"]["NJU2K"]["issues"]["missing_pred"] == ["a.png", "b.png", "c.png", "e.png"]
    assert "missing_pred" in caplog.text and "c.png" in caplog.text
    printed = capsys.readouterr().out
    assert "== NJU2K ==" in printed and "M1" in printed and "input problems" in printed

    # the markdown tables parse and agree with the JSON to the printed precision
    md = (out / "report.md").read_text()
    tables = _markdown_tables(md)
    full = [t for t in tables if t[0][:3] == ["Method", "N", "Sm"]]
    assert len(full) == 2  # NJU2K and NLPR
    rows = {r[0]: r for r in full[0][1:]}
    assert rows["M1"][1] == "2"
    for k, cell in zip(M.METRIC_KEYS, rows["M1"][2:]):
        assert float(cell) == pytest.approx(round(m1[k], report.DIGITS), abs=1e-9), k
    assert rows["M2"][2] == "-"
    summary = next(t for t in tables if t[0][1] == "NJU2K Sm")
    assert float(summary[1][summary[0].index("NJU2K MAE")]) == pytest.approx(m1["MAE"], abs=1e-4)
    problems = next(t for t in tables if t[0][:3] == ["Method", "Dataset", "Problem"])
    assert ["M1", "NJU2K", "resized", "1"] in [r[:4] for r in problems[1:]]
    for name in ("pr_NJU2K.png", "fm_NJU2K.png", "pr_NLPR.png", "fm_NLPR.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
        assert f"]({name})" in md


def test_missing_pred_policies_and_parallel(bench_tree):
    root, expected = bench_tree
    gt_dir, pred_dir = root / "gt" / "NJUD" / "GT", root / "preds" / "M1" / "NJU2K"
    serial = ev.evaluate_folder(pred_dir, gt_dir, missing_pred="zero")
    assert serial["num_images"] == 3  # c.png scored as an all-zero map, still listed
    assert serial["issues"]["missing_pred"] == ["c.png"]
    assert serial["MAE"] != pytest.approx(expected["MAE"])
    parallel = ev.evaluate_folder(pred_dir, gt_dir, missing_pred="zero", workers=2)
    assert {k: parallel[k] for k in M.METRIC_KEYS} == {k: serial[k] for k in M.METRIC_KEYS}
    with pytest.raises(FileNotFoundError, match="c.png"):
        ev.evaluate_folder(pred_dir, gt_dir, missing_pred="error")


def test_cli_errors_are_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no benchmark folders"):
        ev.main(["--gt-root", str(tmp_path / "empty"), "--method", f"X={tmp_path}"])
    with pytest.raises(SystemExit, match="nothing to evaluate"):
        ev.main(["--gt-root", str(tmp_path)])


def _markdown_tables(md: str) -> list[list[list[str]]]:
    """Every pipe table of a markdown text as rows of cells (header first, rule dropped)."""
    tables, cur = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-", ":"} for c in cells):
                cur.append(cells)
        elif cur:
            tables.append(cur)
            cur = []
    return tables


# ---------------------------------------------------------------- label-store generations
def test_label_store_generations_vs_gt(tmp_path, capsys):
    from io import BytesIO

    from jsm_dist.data import pack
    from jsm_dist.labels import LabelStore
    from jsm_dist.labels.tools import iter_tar_samples

    corpus = tmp_path / "corpus"
    assert pack.main(["synth", "--out", str(corpus), "--num-samples", "6", "--image-size", "48",
                      "--samples-per-shard", "3", "--workers", "1", "--no-progress"]) == 0  # fmt: skip
    store = LabelStore.open(corpus / "labels")
    shard_gts = [
        [I.read_gray(BytesIO(f["gt.png"])) for _, f in iter_tar_samples(str(p), want=("gt.png",))]
        for p in sorted(corpus.glob("shard-*.tar"))
    ]
    with store.writer(1) as w:  # generation 1 = the ground truth itself
        for s, gts in enumerate(shard_gts):
            w.write(s, list(range(len(gts))), np.stack(gts))
    store.commit(1)
    res = ev.evaluate_label_store(corpus)
    assert list(res) == ["gen-0", "gen-1"]
    name = next(iter(res["gen-0"]))
    assert res["gen-1"][name]["MAE"] == 0.0 and res["gen-1"][name]["Sm"] == pytest.approx(1.0)
    gen0 = np.concatenate([store.read_many([s] * len(g), range(len(g)), generation=0)
                           for s, g in enumerate(shard_gts)])  # fmt: skip
    direct = M.evaluate_arrays(gen0, np.concatenate(shard_gts))
    assert {k: res["gen-0"][name][k] for k in M.METRIC_KEYS} == pytest.approx(
        {k: direct[k] for k in M.METRIC_KEYS}, abs=1e-12
    )
    held_out = ev.evaluate_label_store(corpus, generations=[0], shards=[1])
    assert list(held_out) == ["gen-0"] and held_out["gen-0"][name]["num_images"] == 3
    with pytest.raises(ValueError, match=r"generations \[7\]"):
        ev.evaluate_label_store(corpus, generations=[7])
    assert ev.main(["--labels", str(corpus), "--workers", "1", "--no-plots"]) == 0
    assert "gen-1" in capsys.readouterr().out
