"""RGB-only prediction: inputs (folder, list, shards), original sizes, rank split, bad files."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from jsm_dist import predict as pr
from jsm_dist.dist import WorldInfo


class MeanModel(nn.Module):
    """Stand-in with JSMModel.predict's contract: saliency = mean of the RGB channels."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def predict(self, rgb: torch.Tensor) -> torch.Tensor:
        assert rgb.ndim == 4 and rgb.shape[1] == 3 and 0 <= rgb.min() and rgb.max() <= 1
        return (rgb.mean(1, keepdim=True) * self.scale).clamp(0, 1)


# (width, height, grey level) of the test images: mixed sizes and aspect ratios
SIZES = [(40, 30, 30), (17, 55, 128), (64, 64, 220), (90, 12, 75)]


def _jpeg_folder(folder, sizes=SIZES):
    folder.mkdir(parents=True, exist_ok=True)
    for k, (w, h, grey) in enumerate(sizes):
        Image.new("RGB", (w, h), (grey, grey, grey)).save(folder / f"img{k}.jpg", quality=95)
    return folder


def _cfg(**kw) -> pr.PredictConfig:
    return pr.PredictConfig(**{"size": 32, "batch_size": 3, "progress": False, **kw})


def test_folder_of_mixed_size_jpegs_gives_maps_at_original_size(tmp_path):
    src = _jpeg_folder(tmp_path / "bench" / "RGB")  # benchmark layout: <dataset>/RGB
    items = pr.list_inputs(tmp_path / "bench")
    summary = pr.predict_images(MeanModel(), items, tmp_path / "out", _cfg())
    assert summary["written"] == len(SIZES) and not summary["failed"]
    for k, (w, h, grey) in enumerate(SIZES):
        with Image.open(tmp_path / "out" / f"img{k}.png") as im:
            assert im.size == (w, h) and im.mode == "L"
            arr = np.asarray(im)
        assert np.abs(arr.astype(int) - grey).max() <= 3, (k, arr.min(), arr.max())
    assert sorted(p.name for p in src.iterdir()) == [f"img{k}.jpg" for k in range(len(SIZES))]


def test_spatial_layout_survives_the_round_trip(tmp_path):
    # a left-dark / right-bright image must come back the same way round (no w/h swap)
    (tmp_path / "in").mkdir()
    arr = np.zeros((20, 50, 3), np.uint8)
    arr[:, 25:] = 255
    Image.fromarray(arr).save(tmp_path / "in" / "half.png")
    pr.predict_images(MeanModel(), pr.list_inputs(tmp_path / "in"), tmp_path / "out", _cfg())
    out = np.asarray(Image.open(tmp_path / "out" / "half.png"))
    assert out.shape == (20, 50)
    assert out[:, :20].max() < 30 and out[:, 30:].min() > 225


def test_list_file_and_rank_split(tmp_path):
    _jpeg_folder(tmp_path / "imgs")
    lst = tmp_path / "list.txt"
    lst.write_text("# test images\n" + "".join(f"imgs/img{k}.jpg\n" for k in range(len(SIZES))))
    items = pr.list_inputs(lst)
    assert [it.name for it in items] == [f"img{k}" for k in range(len(SIZES))]
    done = []
    for rank in range(2):
        s = pr.predict_images(
            MeanModel(), items, tmp_path / "out", _cfg(), WorldInfo(rank, 2, rank)
        )
        assert s["assigned"] == 2 and s["written"] == 2
        done.append(sorted(p.name for p in (tmp_path / "out").glob("*.png")))
    assert done[0] == ["img0.png", "img2.png"]  # rank 0 takes items[0::2]
    assert done[1] == [f"img{k}.png" for k in range(len(SIZES))]


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_packed_corpus_reads_only_rgb_members(tmp_path):
    from jsm_dist.data.corpus import Corpus, ShardInfo

    root = tmp_path / "corpus"
    root.mkdir()
    shards = []
    for s, sizes in enumerate([SIZES[:2], SIZES[2:]]):
        name = f"shard-{s:06d}.tar"
        with tarfile.open(root / name, "w") as tar:
            for k, (w, h, grey) in enumerate(sizes):
                key = f"s{s}_{k}"
                buf = io.BytesIO()
                Image.new("RGB", (w, h), (grey,) * 3).save(buf, format="JPEG", quality=95)
                _member(tar, f"{key}.rgb.jpg", buf.getvalue())
                _member(tar, f"{key}.depth.png", b"broken depth: must never be decoded")
                _member(tar, f"{key}.json", json.dumps({"caption": "x"}).encode())
        shards.append(ShardInfo(name, len(sizes)))
    Corpus(root, "tiny", ["<negative>", "cat"], shards, label_size=(16, 16)).save()
    items = pr.list_inputs(root)
    assert [it.name for it in items] == ["s0_0", "s0_1", "s1_0", "s1_1"]
    summary = pr.predict_images(MeanModel(), items, tmp_path / "out", _cfg())
    assert summary["written"] == 4
    for name, (w, h, grey) in zip(["s0_0", "s0_1", "s1_0", "s1_1"], SIZES):
        arr = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"))
        assert arr.shape == (h, w) and abs(int(arr.mean()) - grey) <= 3


def test_maps_of_a_packed_corpus_carry_the_original_names_and_match_the_gt(tmp_path):
    from helpers import ODD_NAMES, write_benchmark_folder

    from jsm_dist.data import pack
    from jsm_dist.eval.evaluate import evaluate_folder

    src = write_benchmark_folder(tmp_path / "bench")
    args = ["benchmark", "--input", str(src), "--out", str(tmp_path / "c"), "--no-progress"]
    assert pack.main([*args, "--samples-per-shard", "5", "--workers", "1"]) == 0
    items = pr.list_inputs(tmp_path / "c")
    assert sorted(it.name for it in items) == sorted(ODD_NAMES)
    summary = pr.predict_images(MeanModel(), items, tmp_path / "pred", _cfg())
    assert summary["written"] == len(ODD_NAMES)
    # jsm-eval matches prediction and GT by file stem: every sample pairs with its own GT
    result = evaluate_folder(tmp_path / "pred", src / "GT")
    assert result["num_images"] == len(ODD_NAMES)
    assert not {"missing_pred", "missing_gt", "duplicate"} & set(result["issues"])


def test_bad_inputs_are_reported(tmp_path):
    src = _jpeg_folder(tmp_path / "in", SIZES[:2])
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    summary = pr.predict_images(MeanModel(), pr.list_inputs(src), tmp_path / "out", _cfg())
    assert summary["written"] == 2 and [p for p, _ in summary["failed"]] == [
        str(src / "broken.jpg")
    ]
    assert "broken.jpg" in (tmp_path / "out" / "failed_rank0.txt").read_text()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        pr.list_inputs(tmp_path / "empty")
    (tmp_path / "dup").mkdir()
    lst = tmp_path / "dup.txt"
    lst.write_text("in/img0.jpg\ndup/img0.jpg\n")
    with pytest.raises(ValueError, match="same <name>.png"):
        pr.list_inputs(lst)
    with pytest.raises(ValueError, match="batch_size"):
        pr.PredictConfig(batch_size=0)


def test_cli_with_a_saved_tiny_model(tmp_path, capsys):
    from jsm_dist.models import JSMModel, ModelConfig, save_model

    # mode "unsupervised" has no text network: same predict path, no transformers import
    model = JSMModel(ModelConfig(encoder="tiny", mode="unsupervised"), ["<negative>", "cat"])
    save_model(tmp_path / "model.pt", model)
    src = _jpeg_folder(tmp_path / "in", SIZES[:3])
    rc = pr.main(["--model", str(tmp_path / "model.pt"), "--input", str(src),
                  "--out", str(tmp_path / "out"), "--size", "32", "--workers", "0",
                  "--no-progress"])  # fmt: skip
    assert rc == 0
    assert "wrote 3 of 3 maps" in capsys.readouterr().out
    for k, (w, h, _) in enumerate(SIZES[:3]):
        assert Image.open(tmp_path / "out" / f"img{k}.png").size == (w, h)
    # the same image through the Python API gives the same map
    items = pr.list_inputs(src)[:1]
    pr.predict_images(model, items, tmp_path / "api", _cfg())
    a = np.asarray(Image.open(tmp_path / "api" / "img0.png"))
    b = np.asarray(Image.open(tmp_path / "out" / "img0.png"))
    assert np.array_equal(a, b)
    assert pr.model_input_size(model) == pr.DEFAULT_SIZE
    with pytest.raises(SystemExit, match="neither"):
        pr.main(["--model", "x", "--input", str(tmp_path / "nope"), "--out", str(tmp_path)])


def _seen_sizes(monkeypatch) -> list[tuple[int, int]]:
    """Record the input side of every saliency forward of the model jsm-predict loads."""
    seen: list[tuple[int, int]] = []
    load = pr.load_model_file

    def load_and_watch(path):
        model = load(path)
        model.saliency.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[-2:]))
        return model

    monkeypatch.setattr(pr, "load_model_file", load_and_watch)
    return seen


def _run_cli(tmp_path, model_path, *extra: str) -> None:
    src = _jpeg_folder(tmp_path / "in", SIZES[:2])
    rc = pr.main(["--model", str(model_path), "--input", str(src), "--out",
                  str(tmp_path / "out"), "--workers", "0", "--no-progress", *extra])  # fmt: skip
    assert rc == 0


def test_cli_predicts_at_the_recorded_training_size_unless_told(tmp_path, monkeypatch, capsys):
    from jsm_dist.models import JSMModel, ModelConfig, load_model, save_model

    model = JSMModel(ModelConfig(encoder="tiny", mode="unsupervised"), ["<negative>", "cat"])
    save_model(tmp_path / "model.pt", model, train_size=64)
    loaded = load_model(tmp_path / "model.pt")
    assert loaded.train_size == 64 and pr.model_input_size(loaded) == 64
    save_model(tmp_path / "again.pt", loaded)  # re-saving a loaded model keeps the size
    assert load_model(tmp_path / "again.pt").train_size == 64
    seen = _seen_sizes(monkeypatch)
    _run_cli(tmp_path, tmp_path / "model.pt")
    assert seen and set(seen) == {(64, 64)}
    assert "at input size 64" in capsys.readouterr().out
    seen.clear()
    _run_cli(tmp_path, tmp_path / "model.pt", "--size", "40")  # an explicit size wins
    assert seen and set(seen) == {(40, 40)}
    # the Python API without a size: the recorded one too
    seen.clear()
    loaded.saliency.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[-2:]))
    pr.predict_images(loaded, pr.list_inputs(tmp_path / "in"), tmp_path / "api", _cfg(size=None))
    assert set(seen) == {(64, 64)}
    with pytest.raises(ValueError, match="train_size"):
        save_model(tmp_path / "bad.pt", model, train_size=0)


def test_model_file_without_training_size_falls_back_with_a_warning(tmp_path, monkeypatch, caplog):
    from jsm_dist.models import JSMModel, ModelConfig, save_model

    model = JSMModel(ModelConfig(encoder="tiny", mode="unsupervised"), ["<negative>", "cat"])
    save_model(tmp_path / "model.pt", model, train_size=64)
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    del payload["train_size"]  # a file saved before the training size was recorded
    torch.save(payload, tmp_path / "old.pt")
    seen = _seen_sizes(monkeypatch)
    with caplog.at_level("WARNING", logger="jsm_dist.predict"):
        _run_cli(tmp_path, tmp_path / "old.pt")
    assert seen and set(seen) == {(pr.DEFAULT_SIZE, pr.DEFAULT_SIZE)}
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert str(tmp_path / "old.pt") in warning and f"{pr.DEFAULT_SIZE} px" in warning


def test_run_report_evaluates_at_the_recorded_training_size():
    from types import SimpleNamespace

    from jsm_dist.data.stream import DataConfig
    from jsm_dist.eval.runreport import heldout_data_config

    run_cfg = SimpleNamespace(data=DataConfig(train_size=96, batch_size=2))
    assert heldout_data_config(run_cfg, SimpleNamespace(train_size=64)).train_size == 64
    kept = heldout_data_config(run_cfg, SimpleNamespace(train_size=None))
    assert kept.train_size == 96 and kept.batch_size == 2
    assert heldout_data_config(None, SimpleNamespace(train_size=48)).train_size == 48
