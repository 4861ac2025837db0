"""Stand-in training module for launch tests (JSM_TRAIN_MODULE=tests/integration/dist_probe.py).

Initialises accelerate the way jsm_dist.train does (jsm_dist.dist.accelerator_kwargs +
verify_world), all-reduces rank+1, optionally takes one DeepSpeed/DDP step on a tiny model,
and writes ``$PROBE_OUT/rank<r>.json`` with what it saw. ``PROBE_HOLD_S`` keeps the first
run (SLURM_RESTART_COUNT unset or 0) alive after writing ``started<r>`` so a test can signal
or requeue it. Ends with ``os._exit`` (docs/platform.md: gloo processes sometimes abort at
interpreter shutdown otherwise).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import torch
    from accelerate import Accelerator

    from jsm_dist.dist import accelerator_kwargs, verify_world

    argv = sys.argv[1:] if argv is None else argv
    out = Path(os.environ["PROBE_OUT"])
    acc = Accelerator(**accelerator_kwargs())
    verify_world(acc)
    rank = acc.process_index
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    hold = float(os.environ.get("PROBE_HOLD_S", "0"))
    if hold > 0 and restart == 0:
        (out / f"started{rank}").write_text(str(os.getpid()))
        time.sleep(hold)  # the test requeues/cancels the job meanwhile
    total = torch.tensor([float(rank + 1)])
    total = acc.reduce(total, reduction="sum")
    step_loss = None
    if os.environ.get("PROBE_STEP") == "1":
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if acc.state.deepspeed_plugin is not None:
            # no DataLoader goes through prepare(): the "auto" micro batch must be set by hand
            acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 2
        model, opt = acc.prepare(model, opt)
        x = torch.full((2, 4), float(rank + 1))
        loss = model(x).pow(2).mean()
        acc.backward(loss)
        opt.step()
        step_loss = float(loss.detach())
    record = {
        "rank": rank,
        "world": acc.num_processes,
        "local_rank": acc.local_process_index,
        "sum": float(total.item()),
        "distributed_type": str(acc.distributed_type),
        "argv": argv,
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_nodeid": os.environ.get("SLURM_NODEID"),
        "slurm_restart_count": restart,
        "master_addr": os.environ.get("MASTER_ADDR"),
        "master_port": os.environ.get("MASTER_PORT"),
        "step_loss": step_loss,
    }
    tmp = out / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, out / f"rank{rank}.json")
    acc.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
