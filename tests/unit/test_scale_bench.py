"""benchmarks/scale_100k.py end to end on tiny corpora (the 100k run stays outside the suite):
packing, the loader epoch and the refinement pass on 2 real gloo processes, the figures."""

from __future__ import annotations

import json

import pytest

from benchmarks import scale_100k

pytestmark = pytest.mark.slow  # starts 2-process groups (loader and refinement, per size)


def test_scale_bench_runs_every_phase_on_two_ranks(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "scale.json"
    argv = ["--samples", "160", "--small", "80", "--image-size", "32", "--batch", "8"]
    argv += [
        "--samples-per-shard",
        "16",
        "--pack-workers",
        "1",
        "--work",
        str(work),
        "--json",
        str(out),
    ]
    assert scale_100k.main(argv) == 0
    res = json.loads(out.read_text())
    assert [r["samples"] for r in res["rows"]] == [80, 160]
    for row in res["rows"]:
        n = row["samples"]
        assert row["pack"]["samples_per_cpu_s"] > 0 and row["pack"]["cpu_s"] > 0
        # an epoch: n // (2 ranks x 8) batches of 8 on each rank
        assert row["loader"]["samples_per_rank"] == [n // 2, n // 2]
        assert len(row["loader"]["rss_peak_mib"]) == 2
        # every sample refined exactly once over both ranks, generation 1 committed
        assert row["refine"]["samples"] == n and row["refine"]["generation"] == 1
        assert row["refine"]["commit_world_size"] == 2
        assert all(x > 0 for x in row["refine"]["rss_peak_mib"])
        assert row["refine"]["commit_rank0_s"] > 0
        assert row["refine"]["cpu_ms_per_sample"] > 0
        parts = row["refine"]["rank0_parts_s"]
        assert parts["loop_s"] > 0 and parts["close_s"] > 0
        assert sum(parts.values()) == pytest.approx(row["refine"]["wall_s"], rel=0.5)
        disk = row["disk"]
        assert disk["label_generation_bytes_per_sample"] >= 32 * 32  # one uint8 label
        assert disk["label_store_bytes_per_sample"] >= 2 * 32 * 32  # generations 0 and 1
        assert disk["shards_bytes_per_sample"] > 0
        assert not (work / f"synth{n}").exists()  # no --keep: the corpora are removed
    ratios = res["large_vs_small"]
    assert ratios["refine_time_per_sample"] > 0 and ratios["refine_rss_peak_per_rank"] > 0
    printed = capsys.readouterr().out
    assert "goals (within 10%)" in printed and "refine ms/sample" in printed
