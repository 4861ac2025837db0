"""The collective timeout: setting -> accelerate -> the process group, phases, messages.

A real (one-rank, gloo) process group is made in this process the way a launched rank
makes it, so what is read back is what torch would enforce. The real hang (a stopped
rank) is tested with two processes in tests/integration/test_train_faults.py.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from accelerate.utils import InitProcessGroupKwargs

from jsm_dist import dist
from jsm_dist.config import build_config
from jsm_dist.launching.command import free_port

# what gloo raised when a peer was stopped (torch 2.13), and what it raises when one dies
GLOO_TIMEOUT = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] "
    "Timed out waiting 20000ms for recv operation to complete"
)
GLOO_PEER_LOST = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed "
    "by peer [127.0.0.1]:35206. This is typically caused by a remote worker crashing."
)


@pytest.fixture
def one_rank_group(monkeypatch):
    """Environment of rank 0 of a 1-process torchrun job; the group and accelerate's
    singletons are torn down afterwards so later tests see a plain process."""
    import torch
    import torch.distributed as td
    from accelerate.state import AcceleratorState

    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": str(torch.get_num_threads()),  # else accelerate changes it here
    }.items():
        monkeypatch.setenv(key, value)  # restored afterwards (accelerate writes some too)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    if td.is_initialized():
        td.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
    dist.set_phase("start-up", timeout_s=dist.DEFAULT_TIMEOUT_S)


@pytest.mark.parametrize("seconds", [dist.DEFAULT_TIMEOUT_S, 37.0])
def test_timeout_setting_reaches_the_process_group(one_rank_group, seconds):
    # 600 s is accelerate's own handler default: a plain handler would drop it and gloo
    # would wait its default 30 min instead
    acc = dist.make_accelerator(force_cpu=True, timeout_s=seconds)
    assert acc.num_processes == 1 and str(acc.distributed_type) == "DistributedType.MULTI_CPU"
    assert dist.group_timeout_s() == seconds
    assert acc.init_handler.timeout == timedelta(seconds=seconds)


def test_long_phase_raises_the_timeout_then_restores_it(one_rank_group):
    dist.make_accelerator(force_cpu=True, timeout_s=30)
    dist.set_phase("training")
    with dist.long_phase("refinement", 900, "train.refine_timeout_s"):
        assert dist.group_timeout_s() == 900
        msg = dist.describe_collective_failure(RuntimeError(GLOO_TIMEOUT))
        assert "'refinement'" in msg and "900 s" in msg and "train.refine_timeout_s" in msg
        dist.barrier()  # collectives still work on the changed group
    assert dist.group_timeout_s() == 30
    msg = dist.describe_collective_failure(RuntimeError(GLOO_TIMEOUT))
    assert "'training'" in msg and "30 s" in msg and "train.dist_timeout_s" in msg
    with pytest.raises(RuntimeError) as err, dist.long_phase("refinement", 900, "x.y"):
        raise RuntimeError(GLOO_TIMEOUT)
    assert dist.group_timeout_s() == 30 and dist.current_phase().name == "training"
    # caught where main() catches it, outside the phase: the message still names it
    msg = dist.describe_collective_failure(err.value)
    assert "'refinement' timed out after 900 s" in msg and msg.endswith("raise x.y")


def test_deepspeed_cpu_handler_keeps_gloo_and_gets_the_timeout():
    ds = dist.process_group_handlers([InitProcessGroupKwargs(backend="gloo")], 600)
    assert len(ds) == 1
    assert ds[0].to_kwargs() == {"backend": "gloo", "timeout": timedelta(seconds=600)}
    ddp = dist.process_group_handlers([], 600)
    assert ddp[0].to_kwargs() == {"timeout": timedelta(seconds=600)}


def test_failure_message_names_phase_timeout_and_setting():
    dist.set_phase("training", timeout_s=20)
    try:
        msg = dist.describe_collective_failure(RuntimeError(GLOO_TIMEOUT), rank=1)
        assert msg.startswith("rank 1: a collective of phase 'training' timed out after 20 s")
        assert msg.endswith("raise train.dist_timeout_s") and "\n" not in msg
        lost = dist.describe_collective_failure(RuntimeError(GLOO_PEER_LOST), rank=0)
        assert "rank 0" in lost and "went away" in lost and "'training'" in lost
        # gloo without its file name: a DDP buffer broadcast after the timeout (seen)
        pair = dist.describe_collective_failure(
            RuntimeError("Application timeout caused pair closure"), rank=0
        )
        assert pair.startswith("rank 0: a collective of phase 'training' timed out after 20 s")
        # not from a collective: shown in full as a bug, not turned into a one-liner
        assert dist.describe_collective_failure(RuntimeError("DataLoader timed out")) is None
        assert dist.describe_collective_failure(ValueError(GLOO_TIMEOUT)) is None
    finally:
        dist.set_phase("start-up", timeout_s=dist.DEFAULT_TIMEOUT_S)


@pytest.mark.parametrize("key", ["dist_timeout_s", "refine_timeout_s"])
@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_timeout_settings_are_validated(key, value):
    with pytest.raises(ValueError, match=f"train.{key}"):
        build_config(overrides={key: value})
    assert getattr(build_config(overrides={key: "45"}).train, key) == 45.0
