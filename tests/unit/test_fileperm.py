"""Every file a run writes follows the umask (0o666 & ~umask), weights included."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from helpers import make_tiny_corpus

from jsm_dist.checkpoint import Checkpointer, TrainState
from jsm_dist.fileperm import current_umask, file_mode
from jsm_dist.models import JSMModel, ModelConfig, save_model


@pytest.fixture
def umask():
    """Set the process umask for one test, restore it afterwards."""
    saved = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


def _modes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002], ids=oct)
def test_model_checkpoint_and_corpus_files_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask and file_mode() == 0o666 & ~mask
    model = JSMModel(ModelConfig(encoder="tiny", mode="unsupervised"), ["<negative>", "cat"])
    save_model(tmp_path / "run" / "model.pt", model)
    acc = Accelerator(cpu=True)
    net = torch.nn.Linear(3, 2)
    acc.prepare(net, torch.optim.Adam(net.parameters()))  # weights + optimizer state
    ckpt = Checkpointer(tmp_path / "run", keep=2).save(acc, TrainState(global_step=3), "{}")
    make_tiny_corpus(tmp_path, shard_sizes=(3, 2), name="corpus")  # shards + label store
    modes = _modes(tmp_path)
    # the files that used to come out 0600 are there, and nothing differs from the umask
    weights = [k for k in modes if k.endswith(("model.pt", ".safetensors"))]
    assert any(k.startswith(str(ckpt.relative_to(tmp_path))) for k in weights), modes
    assert "run/model.pt" in weights
    assert any(k.startswith("corpus/labels") for k in modes), modes
    wrong = {k: oct(v) for k, v in modes.items() if v != 0o666 & ~mask}
    assert not wrong, json.dumps(wrong)
