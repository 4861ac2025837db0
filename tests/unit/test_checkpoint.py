import json

import torch
from accelerate import Accelerator

from jsm_dist.checkpoint import Checkpointer, TrainState


def _acc_model():
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    return acc, model, opt


def test_save_resume_restores_weights_and_state(tmp_path):
    acc, model, _opt = _acc_model()
    ck = Checkpointer(tmp_path, keep=2)
    state = TrainState(epoch=1, samples_in_epoch=20, samples_seen=52, step_in_epoch=3,
                       global_step=7, label_generation=2)  # fmt: skip
    path = ck.save(acc, state, json.dumps({"x": 1}))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    back = Checkpointer.load(acc, path, samples_per_step=8)
    assert back == state
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k])
    assert json.loads((path / "config.json").read_text()) == {"x": 1}


def test_a_checkpoint_that_records_steps_only_resumes_at_steps_times_samples(tmp_path):
    """Checkpoints written before the data position was a sample count."""
    acc, _, _ = _acc_model()
    path = Checkpointer(tmp_path).save(acc, TrainState(global_step=7), "{}")
    legacy = {"epoch": 1, "step_in_epoch": 3, "global_step": 7, "label_generation": 0,
              "refine_pending": False, "refinements": 1}  # fmt: skip
    (path / "train_state.json").write_text(json.dumps(legacy))
    back = Checkpointer.load(acc, path, samples_per_step=8)
    assert (back.samples_in_epoch, back.samples_seen, back.step_in_epoch) == (24, 56, 3)


def test_latest_ignores_incomplete_and_rotation_keeps_k(tmp_path):
    acc, _, _ = _acc_model()
    ck = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        ck.save(acc, TrainState(global_step=step), "{}")
    names = [p.name for p in ck.complete()]
    assert names == ["step-00000002", "step-00000003"]
    # a crash mid-save leaves a .tmp dir and a dir without train_state.json: both ignored
    (tmp_path / "checkpoints" / "step-00000009.tmp").mkdir()
    (tmp_path / "checkpoints" / "step-00000008").mkdir()
    assert ck.latest().name == "step-00000003"
    assert ck.resolve("latest").name == "step-00000003"
    assert ck.resolve("") is None


def test_resolve_rejects_incomplete_path(tmp_path):
    ck = Checkpointer(tmp_path)
    (tmp_path / "bad").mkdir()
    try:
        ck.resolve(str(tmp_path / "bad"))
    except FileNotFoundError as e:
        assert "not a complete checkpoint" in str(e)
    else:
        raise AssertionError("incomplete checkpoint accepted")
