"""Why the final RGB-only model underfits: fit the saliency network alone on fixed labels.

    python -m benchmarks.saliency_fit [--corpus shards/demo] [--labels DIR] [--epochs 6]
        [--batch 16] [--lr 1e-4] [--decoder-mult 1] [--prior 0] [--size 128]

Trains only the saliency network (the model a user takes home) on the labels of a label
store (default: the corpus' own generation 0, the CDCP labels) with the demo's
augmentation, one process, then scores its RGB-only predictions on the held-out split
against GT. With the joint model out of the way, one run isolates the optimisation
choices: ``--decoder-mult`` (decoder learning rate = lr x this, ``train.decoder_lr_mult``)
and ``--prior`` (starting foreground probability of the output, ``model.saliency_prior``;
0 = PyTorch's default init). Prints one JSON line with the settings, the held-out metrics,
the mean prediction on background and foreground pixels, and the wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from jsm_dist import dist, schema
from jsm_dist.data.batching import to_float
from jsm_dist.data.corpus import Corpus
from jsm_dist.data.stream import DataConfig, make_eval_loader, make_train_loader
from jsm_dist.eval.metrics import evaluate_arrays
from jsm_dist.models import JSMModel, ModelConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.saliency_fit", description=__doc__.split("\n")[0]
    )
    p.add_argument("--corpus", default="shards/demo", help="corpus root with train/ and test/")
    p.add_argument("--labels", default="", help="label store to train on (default: the corpus')")
    p.add_argument("--epochs", type=int, default=6, help="epochs over the training split")
    p.add_argument("--batch", type=int, default=16, help="batch size (one process)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of the encoder")
    p.add_argument("--decoder-mult", type=float, default=1.0, help="decoder lr = lr x this")
    p.add_argument("--prior", type=float, default=0.0, help="starting foreground probability")
    p.add_argument("--size", type=int, default=128, help="train and test size")
    p.add_argument("--seed", type=int, default=0, help="torch seed and loader seed")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    one = dist.WorldInfo(0, 1, 0)
    train = Corpus.load(f"{a.corpus}/train")
    if a.labels:
        train = dataclasses.replace(train, labels=a.labels)
    test = Corpus.load(f"{a.corpus}/test")
    model = JSMModel(
        ModelConfig(mode="unsupervised", crf=False, saliency_prior=a.prior), train.vocab
    )
    net = model.saliency
    groups = model.param_groups(a.lr, a.lr * a.decoder_mult if a.decoder_mult != 1 else None)
    opt = torch.optim.Adam([g for g in groups if g["name"].startswith("saliency")])
    cfg = DataConfig(train_size=a.size, batch_size=a.batch, num_workers=1)
    t0, steps = time.perf_counter(), 0
    model.train()
    for epoch in range(a.epochs):
        for b in make_train_loader(train, cfg, epoch=epoch, seed=a.seed, world=one, read_gt=False):
            b = to_float(b, torch.device("cpu"))
            att, det, _ = net(model._norm_rgb(b[schema.RGB]), feat=None)
            t = b[schema.LABEL]
            loss = (
                F.binary_cross_entropy_with_logits(att, t)
                + F.binary_cross_entropy_with_logits(det, t)
            ) / 2
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_value_(net.parameters(), 0.5)
            opt.step()
            steps += 1
    preds, gts = [], []
    for b in make_eval_loader(
        test, DataConfig(train_size=a.size, batch_size=16, num_workers=0), world=one
    ):
        b = to_float(b, torch.device("cpu"))
        preds.append(model.predict(b[schema.RGB])[:, 0].numpy())
        gts.append(b[schema.GT][:, 0].numpy())
    pred, gt = np.concatenate(preds), np.concatenate(gts) > 0.5
    res = evaluate_arrays(pred, gt.astype(np.uint8) * 255)
    print(json.dumps({
        "settings": vars(a), "steps": steps, "last_loss": round(float(loss), 4),
        **{k: round(float(res[k]), 4) for k in ("Sm", "maxF", "MAE")},
        "mean_pred_bg": round(float(pred[~gt].mean()), 4), "mean_pred_fg": round(float(pred[gt].mean()), 4),
        "seconds": round(time.perf_counter() - t0),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
