import json
import math

from jsm_dist.eval.runreport import (
    choose_generation,
    label_rows,
    plot_label_quality,
    read_log,
    timing,
)


def _event(gen, s_old, s_new, conf, fg_new=0.1):
    return {
        "kind": "event",
        "name": "refine",
        "generation": gen,
        "seconds": 2.0,
        "quality_old": {"Sm": s_old, "maxF": s_old - 0.1, "MAE": 0.1},
        "quality_new": {"Sm": s_new, "maxF": s_new - 0.1, "MAE": 0.09},
        "fg_old": 0.1,
        "fg_new": fg_new,
        "w_g_mean": 0.6,
        "w_g_std": 0.1,
        "text_conf": conf,
        "mean_abs_change": 0.02,
        "choice": {"favours_better": 0.25 * gen, "cand_better": 0.3},
    }


def test_label_rows_from_refine_events(tmp_path):
    recs = [
        {"kind": "step", "step": 1, "loss": 1.0, "samples": 8, "step_time": 2.0, "data_time": 0.5},
        _event(1, 0.70, 0.74, 0.3),
        _event(2, 0.74, 0.72, 0.5),
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    rows = label_rows(read_log(tmp_path))
    assert [r["generation"] for r in rows] == [0, 1, 2]
    assert rows[0]["Sm"] == 0.70 and math.isnan(rows[0].get("text conf", math.nan))
    assert rows[2]["Sm"] == 0.72 and rows[2]["text conf"] == 0.5
    assert rows[2]["favours better"] == 0.5 and rows[1]["L_d better"] == 0.3
    assert math.isnan(rows[0].get("favours better", math.nan))
    # the GT-free rule follows text confidence (gen 2) while GT prefers gen 1
    ch = choose_generation(rows)
    assert ch["chosen"] == 2 and ch["gt_best"] == 1
    tm = timing(recs)
    assert tm["samples_per_s"] == 4.0 and tm["data_wait_frac"] == 0.25
    assert tm["refine_share"] == 4.0 / 6.0
    recs[1]["text_fit"] = {"seconds": 3.0, "samples": 8}  # text fitting counts as refinement
    tm = timing(recs)
    assert tm["text_fit_s"] == 3.0 and tm["refine_share"] == 7.0 / 9.0
    recs[1]["text_fit"]["collect_seconds"] = 1.0
    recs[1]["phases"] = {"decode": 0.5, "crf": 2.0}
    recs[2]["phases"] = {"decode": 0.25, "crf": 1.0}
    assert timing(recs)["phases"] == {"collect": 1.0, "fit": 2.0, "decode": 0.75, "crf": 3.0}
    png = plot_label_quality(rows, tmp_path / "q.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_log_is_a_clear_error(tmp_path):
    try:
        read_log(tmp_path)
    except FileNotFoundError as e:
        assert "metrics.jsonl" in str(e)
    else:
        raise AssertionError("no error for a directory without metrics.jsonl")


def test_carried_over_samples_get_a_column(tmp_path):
    from jsm_dist.eval.runreport import LABEL_COLS, build_report

    ev = _event(1, 0.70, 0.74, 0.3)
    ev["carried_over"] = 3  # samples the pass could not read
    (tmp_path / "metrics.jsonl").write_text(json.dumps(ev))
    rows = label_rows(read_log(tmp_path))
    assert rows[1]["carried over"] == 3 and math.isnan(rows[0].get("carried over", math.nan))
    md = build_report(tmp_path, None, tmp_path).read_text()
    header = next(line for line in md.splitlines() if line.startswith("| generation"))
    row = next(line for line in md.splitlines() if line.startswith("| 1 |"))
    col = [c.strip() for c in header.strip("|").split("|")].index("carried over")
    assert col == LABEL_COLS.index("carried over")
    assert [c.strip() for c in row.strip("|").split("|")][col] == "3"
