"""The text network's fast forward vs BERT's own, side by side: a text fit on cached features.

    python -m benchmarks.text_forward [--corpus shards/demo/train] [--samples 384]
        [--rows 6] [--epochs 3] [--repeats 3] [--text-model tiny]

Runs :func:`jsm_dist.refine.textfit.fit_pooled` (what ``train.text_fit_epochs`` does before
each refinement, after the features are cached) on the captions of ``--corpus`` (the demo's
by default) with random pooled features of ``--rows`` maps per sample (2 + the demo's 4
negatives), once with ``TSM.fast = False`` (the plain BERT call on the cache's padded
length) and once with the fast path (each batch cut to its longest caption, the last layer at
the mask position only), alternating, ``--repeats`` times each, one torch thread. Prints the
seconds of each and the ratio of the medians. Both fits compute the same function (tested in
tests/unit/test_text_fast.py); their dropout draws differ, so their losses differ slightly.
"""

from __future__ import annotations

import argparse
import statistics
import time


def captions(corpus_dir: str, n: int) -> tuple[list[str], list[int], list[int], list[str]]:
    """The first ``n`` samples' (caption, salient word position, word class), the vocabulary."""
    from jsm_dist import schema
    from jsm_dist.data.corpus import Corpus
    from jsm_dist.data.stream import DataConfig, make_eval_loader

    corpus = Corpus.load(corpus_dir)
    loader = make_eval_loader(corpus, DataConfig(batch_size=32, num_workers=0, augment=False))
    caps, pos, words = [], [], []
    for batch in loader:
        caps += list(batch[schema.CAPTION])
        pos += batch[schema.WORD_POS].tolist()
        words += batch[schema.WORD].tolist()
        if len(caps) >= n:
            break
    return caps[:n], pos[:n], words[:n], corpus.vocab


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default="shards/demo/train", help="packed corpus (its captions)")
    ap.add_argument("--samples", type=int, default=384, help="cached samples to fit on")
    ap.add_argument("--rows", type=int, default=6, help="pooled maps per sample (2 + negatives)")
    ap.add_argument("--epochs", type=int, default=3, help="fitting epochs per timed fit")
    ap.add_argument("--repeats", type=int, default=3, help="timed fits per variant")
    ap.add_argument("--text-model", default="tiny", help="ModelConfig.text_model")
    args = ap.parse_args(argv)

    import torch

    from jsm_dist.models.text import TSM
    from jsm_dist.refine.textfit import fit_pooled

    torch.set_num_threads(1)
    caps, pos, words, vocab = captions(args.corpus, args.samples)
    torch.manual_seed(0)
    tsm = TSM(vocab, feat_channels=112, text_model=args.text_model, load_pretrained=False)
    pooled = torch.rand(args.rows, len(caps), 112)
    times: dict[bool, list[float]] = {False: [], True: []}
    for rep in range(args.repeats):
        for fast in (False, True):
            tsm.fast = fast
            t0 = time.perf_counter()
            _, st = fit_pooled(tsm, pooled, caps, torch.tensor(pos), torch.tensor(words),
                               epochs=args.epochs, lr=1e-3, seed=rep, clip=None)  # fmt: skip
            times[fast].append(time.perf_counter() - t0)
            print(f"repeat {rep} {'fast ' if fast else 'plain'}: {times[fast][-1]:7.2f} s  "
                  f"loss {st.loss_first:.4f} -> {st.loss_last:.4f}", flush=True)  # fmt: skip
    plain, fast = statistics.median(times[False]), statistics.median(times[True])
    print(f"{len(caps)} samples x {args.rows} rows, {args.epochs} epochs: plain {plain:.2f} s, "
          f"fast {fast:.2f} s (medians): plain / fast = {plain / fast:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
