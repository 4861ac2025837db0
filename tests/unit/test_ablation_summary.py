"""benchmarks.ablation's summary: means over seeds and the text's gain per seed."""

from __future__ import annotations

import math

from benchmarks.ablation import summary_table


def _run(seed, sm_last, held_sm):
    return {
        "seed": seed,
        "first": {"Sm": 0.70, "maxF": 0.50, "main off": 0.4},
        "last": {"Sm": sm_last, "maxF": sm_last - 0.1, "main off": 0.1},
        "held": {"Sm": held_sm, "maxF": 0.6, "MAE": 0.1},
        "base": {"Sm": 0.69, "maxF": 0.5, "MAE": 0.07},
    }


def test_summary_means_over_seeds_and_text_gain():
    finals = {
        "blend": [_run(0, 0.76, 0.60), _run(1, 0.78, 0.62)],
        "regions-notext": [_run(0, 0.77, 0.65), _run(1, 0.79, 0.66)],
        "regions-text": [_run(0, 0.82, 0.70), _run(1, 0.80, 0.72)],
    }
    lines = summary_table(finals)
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ")}
    cells = [c.strip() for c in rows["regions-text"].strip("|").split("|")]
    assert cells[1] == "2" and cells[2] == "0.810" and cells[5] == "0.710" and cells[8] == "0.690"
    assert [c.strip() for c in rows["initial (CDCP)"].strip("|").split("|")][2] == "0.700"
    gain = next(line for line in lines if line.startswith("Text gain"))
    assert "seed 0: +0.050" in gain and "seed 1: +0.010" in gain and "mean +0.030" in gain
    assert summary_table({}) == []
    assert not math.isnan(float(cells[3]))
