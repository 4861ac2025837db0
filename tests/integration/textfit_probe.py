"""A rank of the data-parallel text-fitting tests (tests/integration/test_textfit_dist.py).

    python textfit_probe.py CORPUS OUT RANK WORLD PORT DROPOUT MODE

Joins a gloo group of WORLD processes (none when WORLD is 1), builds the same seeded tiny
model as every other rank, runs ``jsm_dist.refine.textfit.fit_scorer`` and saves
``OUT/rank<RANK>.pt`` (fitted and initial text weights, stats, samples this rank owns).
MODE "apart": rank 1 starts from other text weights (the fit must then fail on every rank,
exit code 3). Ends with ``os._exit`` (gloo processes sometimes abort at interpreter shutdown
otherwise).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch

SIZE = 32
EPOCHS = 4


def tiny_model(vocab: list[str], dropout: float):
    """The same model in every process (seeded): the fits start from the same weights."""
    from jsm_dist.models import JSMModel, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(
        encoder="tiny",
        pretrained=False,
        text_hidden=32,
        text_layers=1,
        crf=False,
        text_dropout=dropout,
    )
    return JSMModel(cfg, vocab)


def data_config():
    from jsm_dist.data.stream import DataConfig

    return DataConfig(train_size=SIZE, batch_size=2, num_workers=0)


def main(root: str, out: str, rank: int, world: int, port: str, dropout: float, mode: str):
    import torch.distributed as td

    from jsm_dist.data.corpus import Corpus
    from jsm_dist.refine.textfit import capped_shards, fit_scorer

    torch.set_num_threads(1)
    if world > 1:
        td.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    corpus = Corpus.load(root)
    model = tiny_model(corpus.vocab, dropout)
    if mode == "apart" and rank == 1:  # a rank whose text weights differ from the others'
        with torch.no_grad():
            model.text.head[1].bias.add_(0.01)
    initial = {k: v.clone() for k, v in model.text.state_dict().items()}
    code = 0
    try:
        fitted, stats = fit_scorer(
            model, corpus, data_config(), device=torch.device("cpu"), epochs=EPOCHS,
            lr=1e-3, seed=5, clip=0.5,
        )  # fmt: skip
    except RuntimeError as e:
        print(f"rank {rank}: {e}", flush=True)
        code = 3
    else:
        mine = capped_shards(corpus, world, rank, 0)
        record = {
            "state": fitted.state_dict(),
            "initial": initial,
            "stats": {k: v for k, v in asdict(stats).items() if not k.endswith("seconds")},
            "cached": sum(corpus.shard_sizes[s] for s in mine),
        }
        torch.save(record, Path(out) / f"rank{rank}.pt")
        print(json.dumps(record["stats"]), flush=True)
    if world > 1:
        td.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.stdout.flush()
    code = main(
        sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5],
        float(sys.argv[6]), sys.argv[7],
    )  # fmt: skip
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # gloo processes sometimes abort at interpreter shutdown otherwise
