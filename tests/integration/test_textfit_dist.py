"""Data-parallel text fitting (jsm_dist/refine/textfit.py) under real processes: 2 gloo ranks fit
the same weights, the same fit as one process, on equal, uneven and one-sided shards.

The ranks are tests/integration/textfit_probe.py run as a script: each builds the same tiny
model, runs ``fit_scorer`` on the shards it owns and saves the fitted weights and stats.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_corpus
from textfit_probe import SIZE, data_config, tiny_model

from jsm_dist.launching.command import free_port

pytestmark = pytest.mark.slow

PROBE = Path(__file__).with_name("textfit_probe.py")
CHILD_TIMEOUT = 300  # seconds; generous for a loaded 2-core machine, a hang fails the test
# 2 processes vs 1, dropout off: the fits differ only in float summation order (a batch's
# gradient is summed over 2 micro-batches, then across the ranks). Measured max |difference|
# on both corpora below after 4 epochs (12 Adam steps, lr 1e-3): log-probabilities 4.8e-7,
# epoch losses 4e-8, weights 3.8e-6 in the attention key biases (their gradient is zero in
# exact arithmetic, so it is pure rounding noise, which Adam scales up; they do not change
# the outputs) and 1.2e-7 elsewhere. The tolerances leave a 13-20x margin and stay well
# below what a wrong step does: averaging instead of summing the ranks' gradients moved
# the weights by 1.8e-3, clipping before the sum by 9.7e-4.
LOGP_TOL = 1e-5
WEIGHT_TOL = 5e-5


def run_fit(root: Path, out: Path, world: int, *, dropout: float = 0.0, mode: str = "same"):
    """Fit with ``world`` processes; returns (return codes, outputs)."""
    out.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(PROBE), str(root), str(out), str(r), str(world), port]
            + [str(dropout), mode],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    codes, logs = [], []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=CHILD_TIMEOUT)[0])
            codes.append(p.returncode)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return codes, "\n".join(log[-3000:] for log in logs)


def load(out: Path, rank: int) -> dict:
    return torch.load(out / f"rank{rank}.pt", weights_only=False)


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def probe_log_probs(corpus, state: dict) -> torch.Tensor:
    """The fitted scorer's log-probabilities on every sample's cached features."""
    from jsm_dist.refine.textfit import collect_pooled

    model = tiny_model(corpus.vocab, 0.0)
    model.text.load_state_dict(state)
    model.text.eval()
    cache = collect_pooled(model, corpus, data_config(), torch.device("cpu"))
    tokens = model.text.encode_text(cache["caption"], cache["word_pos"], cache["word"])
    pooled = torch.from_numpy(cache["pooled"]).transpose(0, 1)
    with torch.no_grad():
        return torch.log_softmax(model.text.forward_pooled(pooled, tokens), -1)


@pytest.mark.parametrize(
    "shards",
    [(6, 6, 6, 6), (9, 5, 7, 3)],
    ids=["equal", "uneven"],  # rank 0 owns shards 0 and 2, rank 1 shards 1 and 3
)
def test_two_ranks_fit_the_same_weights_as_one_process(tmp_path, shards):
    corpus = make_tiny_corpus(tmp_path / "corpus", shard_sizes=shards, size=SIZE)
    codes, logs = run_fit(corpus.root, tmp_path / "two", 2)
    assert codes == [0, 0], logs
    codes, logs = run_fit(corpus.root, tmp_path / "one", 1)
    assert codes == [0], logs
    r0, r1, one = load(tmp_path / "two", 0), load(tmp_path / "two", 1), load(tmp_path / "one", 0)
    for k, v in r0["state"].items():  # bit-identical on both ranks
        assert torch.equal(v, r1["state"][k]), k
    assert r0["stats"] == r1["stats"]
    assert r0["stats"]["samples"] == one["stats"]["samples"] == sum(shards)
    assert min(r0["cached"], r1["cached"]) > 0 and r0["cached"] + r1["cached"] == sum(shards)
    assert max_diff(one["state"], r0["state"]) < WEIGHT_TOL
    logp_one, logp_two = probe_log_probs(corpus, one["state"]), probe_log_probs(corpus, r0["state"])
    assert float((logp_one - logp_two).abs().max()) < LOGP_TOL
    for key in ("loss_first", "loss_last"):
        assert abs(one["stats"][key] - r0["stats"][key]) < 1e-5, key
    assert r0["stats"]["loss_last"] < r0["stats"]["loss_first"]
    assert max_diff(one["state"], r0["initial"]) > 2e-3  # the fit moved the weights


def test_a_rank_without_samples_takes_every_step_with_dropout_on(tmp_path):
    corpus = make_tiny_corpus(tmp_path / "corpus", shard_sizes=(7,), size=SIZE)
    codes, logs = run_fit(corpus.root, tmp_path / "two", 2, dropout=0.1)
    assert codes == [0, 0], logs  # no hang: rank 1 ran empty micro-batches
    r0, r1 = load(tmp_path / "two", 0), load(tmp_path / "two", 1)
    assert (r0["cached"], r1["cached"]) == (7, 0)
    assert r0["stats"] == r1["stats"] and r0["stats"]["samples"] == 7
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    assert max_diff(r0["state"], r0["initial"]) > 2e-3  # more than 2 Adam steps (lr 1e-3)


def test_ranks_that_start_apart_fail_on_both_ranks(tmp_path):
    corpus = make_tiny_corpus(tmp_path / "corpus", shard_sizes=(6, 6), size=SIZE)
    codes, logs = run_fit(corpus.root, tmp_path / "two", 2, mode="apart")
    assert codes == [3, 3], logs  # both raise, neither hangs
    assert logs.count("the fitted weights differ across ranks") == 2, logs
