"""Real RGB-D benchmark samples end to end, as a user runs them: pack a benchmark folder with
the default settings, train 2 processes at the default train size with the default
augmentation, refine, predict from RGB and evaluate against the original GT.

The samples (tests/data/real, see SOURCES.md there) are what breaks synthetic-only code:
640x480 and 960x1080 images (several times the train size), 8-bit BMP and PNG depth with
near = dark, a benchmark resized to 256x256 with soft GT, names of every shape.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jsm_dist import predict
from jsm_dist.data import pack
from jsm_dist.data.corpus import Corpus
from jsm_dist.eval import evaluate
from jsm_dist.labels import LabelStore
from jsm_dist.launching.command import local_launch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
REAL = REPO / "tests" / "data" / "real"
WITH_GT = ("DES", "SSD", "DUT-RGBD")


def _benchmark_folder(root: Path) -> list[str]:
    """The GT-carrying real samples of every source in one RGB/ depth/ GT/ folder."""
    names = []
    for sub in ("RGB", "depth", "GT"):
        (root / sub).mkdir(parents=True)
    for src in WITH_GT:
        for sub in ("RGB", "depth", "GT"):
            for f in sorted((REAL / src / sub).iterdir()):
                shutil.copy(f, root / sub / f.name)
                if sub == "RGB":
                    names.append(f.stem)
    return names


def test_real_benchmark_folder_packs_trains_refines_predicts_and_evaluates(tmp_path):
    folder = tmp_path / "REAL"
    names = _benchmark_folder(folder)
    corpus_dir = tmp_path / "corpus"
    # defaults except the shard size: 15 samples need >= 2 non-empty shards for 2 ranks
    args = ["benchmark", "--input", str(folder), "--out", str(corpus_dir)]
    assert pack.main([*args, "--samples-per-shard", "8", "--no-progress"]) == 0
    corpus = Corpus.load(corpus_dir)
    assert corpus.num_samples == len(names) and len(corpus.shards) == 2
    counts = corpus.depth_orientation
    assert counts["near_is_large"] + counts["far_is_large"] == len(names)
    assert counts["far_is_large"] >= 8  # DES and SSD store near = dark

    run = tmp_path / "run"
    train = [
        "--corpus", str(corpus_dir), "--out_dir", str(run), "--model.mode", "unsupervised",
        "--model.encoder", "tiny", "--model.pretrained", "false", "--epochs", "1",
        "--tau", "1", "--data.num_workers", "1", "--tensorboard", "false",
    ]  # fmt: skip
    cmd, env = local_launch(2, train, mode="cpu")
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert r.returncode == 0, r.stderr[-4000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    refine = [e for e in records if e.get("name") == "refine"]
    assert len(refine) == 1 and refine[0]["samples"] == len(names)
    assert refine[0]["carried_over"] == 0
    assert json.loads((run / "config.json").read_text())["data"]["train_size"] == 256
    store = LabelStore.open(run / "labels")
    assert store.generation == 1

    preds = tmp_path / "preds" / "jsm" / "REAL"
    assert predict.main(["--model", str(run / "model.pt"), "--input", str(folder), "--out",
                         str(preds), "--no-progress"]) == 0  # fmt: skip
    for name in names:
        rgb = next((folder / "RGB").glob(f"{name}.*"))
        out = preds / f"{name}.png"
        assert Image.open(out).size == Image.open(rgb).size, name  # original sizes
        assert np.asarray(Image.open(out)).std() > 0, name  # a map, not a constant

    report = tmp_path / "report"
    assert evaluate.main(["--gt-root", str(tmp_path), "--pred-root", str(tmp_path / "preds"),
                          "--datasets", "REAL", "--out", str(report)]) == 0  # fmt: skip
    scores = json.loads((report / "results.json").read_text())["results"]["jsm"]["REAL"]
    assert scores["num_images"] == len(names)  # every map matched to its original GT
    assert all(np.isfinite(scores[k]) for k in ("Sm", "maxF", "MAE"))
