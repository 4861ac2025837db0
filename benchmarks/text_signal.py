"""Does the text network carry a usable signal? A short CPU training run on synthetic scenes.

    python -m benchmarks.text_signal [--train 500] [--test 120] [--size 128] [--epochs 5]
                                         [--encoder efficientnet_lite0] [--threads 1]

Builds scenes in memory with ``jsm_dist.data.synth.generate`` (captions name the salient
object's class once and often the distractors' classes too), initial CDCP pseudo-labels with
``jsm_dist.data.initial.initial_saliency``, trains a weak-mode :class:`JSMModel` (pretrained
EfficientNet-Lite0 by default) on those labels, then reports:

Budget choices (CPU, minutes instead of the reference's 60 GPU epochs): joint training at
``--lr`` 5e-4 (reference 1e-4; at 1e-4 four epochs left the saliency BCE at 0.49 and the text
network at chance), then ``--text-epochs`` extra epochs of the text network alone on cached
pooled features (see :func:`train_text_cached`; exactly joint training with the image
learning rates at 0, since the text loss is detached from the image networks).

1. the text network's accuracy at the masked salient word on held-out scenes (and the
   training scenes) when the visual token is the feature masked by: the GT mask, the
   predicted saliency, the current (initial) label, the BNS candidate, the whole image, and
   nothing (all-zero map = no visual input, i.e. text only); plus chance (1 / #words) and the
   best any text-only guesser can do (1 / #words not already named in the caption);
2. the JSM weights ``(w_g, w_d)`` over the training scenes (mean, std; stuck at 0.5 = dead
   text signal);
3. how often the update favours the better candidate (current label ``L_g`` vs depth-refined
   ``L_d``), judged by S-measure against GT (pysodmetrics ``Smeasure``), over all scenes and
   over the scenes where the two differ by at least ``--margin`` S-measure;
4. the mean S-measure / max-F of ``L_g``, ``L_d``, the JSM update, the text-free (0.5/0.5)
   update and the reference post-processing (sigmoid, min-max, CRF), and the labels'
   foreground fraction (a shrinking label can look better by MAE alone).
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np
import torch

from jsm_dist import jsm, schema
from jsm_dist.config import TrainConfig
from jsm_dist.models import JSMModel, ModelConfig

REFERENCE_CLIP = TrainConfig().clip_value  # gradient value clipping of the reference (0.5)

log = logging.getLogger("benchmarks.text_signal")


# ---- data ----------------------------------------------------------------------------------
def build_scenes(num: int, size: int, seed: int, start: int = 0) -> dict:
    """``num`` synthetic scenes as one in-memory batch dict (schema keys) + the vocabulary."""
    from jsm_dist.data.decode import normalize_depth
    from jsm_dist.data.initial import initial_saliency
    from jsm_dist.data.synth import VOCAB as SHAPES
    from jsm_dist.data.synth import SynthConfig, generate
    from jsm_dist.data.vocab import build_vocab

    vocab = build_vocab(SHAPES)
    samples = list(
        generate(SynthConfig(num_samples=start + num, image_size=size, seed=seed), start)
    )
    rgb = np.stack([s["rgb"] for s in samples])
    depth = normalize_depth(np.stack([s["depth"] for s in samples]))
    init = initial_saliency(rgb, depth)
    metas = [s["meta"] for s in samples]
    return {
        schema.RGB: torch.from_numpy(rgb).permute(0, 3, 1, 2).float().div(255.0),
        schema.DEPTH: torch.from_numpy(depth)[:, None],
        schema.LABEL: torch.from_numpy(init)[:, None].float(),
        schema.GT: torch.from_numpy(np.stack([s["gt"] for s in samples]) > 127)[:, None].float(),
        schema.WORD: torch.tensor([vocab.index(m["word"]) for m in metas]),
        schema.WORD_POS: torch.tensor([m["word_pos"] for m in metas]),
        schema.CAPTION: [m["caption"] for m in metas],
        "vocab": vocab,
    }


def take(data: dict, idx) -> dict:
    idx = torch.as_tensor(idx)
    out = {}
    for k, v in data.items():
        if k == "vocab":
            continue
        out[k] = v[idx] if torch.is_tensor(v) else [v[i] for i in idx.tolist()]
    return out


def batches(data: dict, batch: int, order=None):
    n = len(data[schema.CAPTION])
    order = torch.arange(n) if order is None else order
    for i in range(0, n, batch):
        yield take(data, order[i : i + batch])


# ---- train / measure -----------------------------------------------------------------------
def train(
    model: JSMModel, data: dict, epochs: int, batch: int, lr: float, text_lr: float, seed: int
):
    opt = torch.optim.Adam(model.param_groups(lr, text=text_lr))
    g = torch.Generator().manual_seed(seed)
    n = len(data[schema.CAPTION])
    model.train()
    for epoch in range(epochs):
        t0, sums, steps = time.perf_counter(), {}, 0
        for b in batches(data, batch, torch.randperm(n, generator=g)):
            opt.zero_grad()
            out = model(b)
            out["loss"].backward()
            model.clip_gradients(REFERENCE_CLIP)
            opt.step()
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            steps += 1
        log.info(
            "epoch %d/%d  %s  %.1f samples/s",
            epoch + 1,
            epochs,
            "  ".join(f"{k}={v / steps:.4f}" for k, v in sums.items()),
            n / (time.perf_counter() - t0),
        )


def train_text_cached(model: JSMModel, data: dict, epochs: int, batch: int, lr: float, seed: int):
    """More text-network epochs with the image networks frozen, on cached pooled features:
    :func:`jsm_dist.refine.textfit.fit_pooled` (what ``train.text_fit_epochs`` does before each
    refinement in a run); the fitted copy replaces ``model.text``."""
    if epochs <= 0:
        return
    from jsm_dist.refine.textfit import fit_pooled

    pooled = torch.cat([model.text_pooled(b[schema.RGB]) for b in batches(data, batch)], 1)
    model.text, stats = fit_pooled(
        model.text,
        pooled,
        data[schema.CAPTION],
        data[schema.WORD_POS],
        data[schema.WORD],
        epochs=epochs,
        lr=lr,
        batch_size=batch,
        seed=seed + 1,
        clip=REFERENCE_CLIP,
    )
    log.info(
        "text fitting: %d epochs, loss_txt %.4f -> %.4f (%.1fs)",
        epochs,
        stats.loss_first,
        stats.loss_last,
        stats.seconds,
    )
    model.eval()


MAPS = ("gt", "predicted", "current_label", "candidate_Ld", "whole_image", "none")


@torch.no_grad()
def text_accuracy(model: JSMModel, data: dict, batch: int) -> dict[str, float]:
    """Accuracy at the masked word for each visual map in :data:`MAPS`."""
    hits = {k: 0 for k in (*MAPS, "none_best_word")}
    n = 0
    for b in batches(data, batch):
        pred = model.predict(b[schema.RGB])
        cand = model.refine(b)["candidate"]
        ones = torch.ones_like(pred)
        maps = torch.stack(
            [b[schema.GT], pred, b[schema.LABEL], cand, ones, torch.zeros_like(pred)]
        )
        logp = model.text_log_probs(b, maps)  # (K, B, C)
        word = b[schema.WORD]
        for k, name in enumerate(MAPS):
            hits[name] += int((logp[k].argmax(-1) == word).sum())
        hits["none_best_word"] += int((logp[-1][:, 1:].argmax(-1) + 1 == word).sum())
        n += len(word)
    return {k: v / n for k, v in hits.items()}


def text_only_baselines(train: dict, test: dict, vocab: list[str]) -> dict[str, float]:
    """Guessers that read only the masked caption, on ``test``.

    ``uniform``: expected accuracy when the salient word is uniform over the shape words the
    caption does not name elsewhere. ``prior``: pick, among those words, the one most frequent
    as salient word in ``train`` (uses the class imbalance a text-only network can learn).
    """
    words = vocab[1:]
    prior = np.bincount(train[schema.WORD].numpy(), minlength=len(vocab)).astype(float)
    uni, hits = [], []
    for cap, pos, w in zip(
        test[schema.CAPTION], test[schema.WORD_POS].tolist(), test[schema.WORD].tolist()
    ):
        named = {t.strip(".,").lower() for i, t in enumerate(cap.split()) if i != pos}
        cands = [vocab.index(x) for x in words if x not in named]
        uni.append(1.0 / max(1, len(cands)))
        hits.append(max(cands, key=lambda c: prior[c]) == w)
    return {"uniform": float(np.mean(uni)), "prior": float(np.mean(hits))}


def _u8(m: torch.Tensor) -> np.ndarray:
    return (m.clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def smeasures(maps: torch.Tensor, gts: torch.Tensor) -> np.ndarray:
    from jsm_dist.eval.metrics import smeasure_per_image

    return smeasure_per_image(_u8(maps[:, 0]), _u8(gts[:, 0]))


def max_fmeasure(maps: torch.Tensor, gts: torch.Tensor) -> float:
    import warnings

    from py_sod_metrics import Fmeasure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "use FmeasureV2": same curve, deprecation notice only
        fm = Fmeasure()
    for m, g in zip(maps[:, 0], gts[:, 0]):
        fm.step(_u8(m), _u8(g))
    return float(fm.get_results()["fm"]["curve"].max())


@torch.no_grad()
def update_quality(model: JSMModel, data: dict, batch: int, margin: float, crf: bool) -> dict:
    """JSM weights and candidate choice over ``data`` (un-augmented training scenes)."""
    conf, cand = [], []
    for b in batches(data, batch):
        r = model.refine(b)
        conf.append(r["conf"])
        cand.append(r["candidate"])
    conf, l_d = torch.cat(conf), torch.cat(cand)
    l_g, gt = data[schema.LABEL], data[schema.GT]
    s_g, s_d = smeasures(l_g, gt), smeasures(l_d, gt)
    w_d = conf[:, 1].numpy()
    favour_d = w_d > 0.5
    undecided = np.abs(w_d - 0.5) < 0.01  # no real preference: counted as NOT favouring the better
    better_d = s_d > s_g
    decisive = np.abs(s_d - s_g) >= margin
    right = (favour_d == better_d) & ~undecided
    # base-rate free: mean of the hit rates on "L_d better" and on "L_g better" scenes
    balanced = (
        0.5 * (right[better_d].mean() + right[~better_d].mean())
        if 0 < better_d.sum() < len(better_d)
        else float("nan")
    )

    # object level: share of each label's mass on the GT object; "one-sided" scenes have one
    # candidate mostly on the object (>= 0.5) and the other mostly off it (< 0.3)
    def on_object(lab: torch.Tensor) -> np.ndarray:
        return ((lab * gt).flatten(1).sum(1) / lab.flatten(1).sum(1).clamp(min=1e-6)).numpy()

    on_g, on_d = on_object(l_g), on_object(l_d)
    g_only = (on_g >= 0.5) & (on_d < 0.3)
    d_only = (on_d >= 0.5) & (on_g < 0.3)
    jsm_raw = jsm.jsm_update(l_g, l_d, conf)
    equal = jsm.jsm_update(l_g, l_d, torch.full_like(conf, 0.5))
    labels = {
        "L_g (current)": l_g,
        "L_d (candidate)": l_d,
        "JSM update (raw)": jsm_raw,
        "equal-weight update": equal,
        "JSM + sigmoid/minmax": jsm.postprocess(jsm_raw),
    }
    if crf:
        labels["JSM + sigmoid/minmax + CRF"] = crf.dense_crf(
            jsm.postprocess(jsm_raw), data[schema.RGB]
        )
    quality = {
        name: {
            "S": round(float(smeasures(m, gt).mean()), 4),
            "maxF": round(max_fmeasure(m, gt), 4),
            "fg_frac": round(float((m > 0.5).float().mean()), 4),
        }
        for name, m in labels.items()
    }
    quality["GT"] = {"S": 1.0, "maxF": 1.0, "fg_frac": round(float(gt.mean()), 4)}
    return {
        "w_d_mean": float(w_d.mean()),
        "w_d_std": float(w_d.std()),
        "w_d_quantiles_10_50_90": [float(q) for q in np.quantile(w_d, [0.1, 0.5, 0.9])],
        "frac_favour_candidate": float(favour_d.mean()),
        "frac_candidate_better": float(better_d.mean()),
        "frac_undecided": float(undecided.mean()),
        "favours_better_all": float(right.mean()),
        "favours_better_balanced": float(balanced),
        "favours_better_ignoring_undecided": float(right[~undecided].mean())
        if (~undecided).any()
        else float("nan"),
        "favours_better_decisive": float(right[decisive].mean())
        if decisive.any()
        else float("nan"),
        "n_decisive": int(decisive.sum()),
        "n": len(w_d),
        "corr_wd_vs_Sd_minus_Sg": float(np.corrcoef(w_d, s_d - s_g)[0, 1]),
        "one_sided_Lg_on_object": [
            int(g_only.sum()),
            float((w_d[g_only] < 0.5).mean()) if g_only.any() else float("nan"),
        ],
        "one_sided_Ld_on_object": [
            int(d_only.sum()),
            float((w_d[d_only] > 0.5).mean()) if d_only.any() else float("nan"),
        ],
        "label_quality": quality,
    }


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    train_data = build_scenes(args.train, args.size, args.seed)
    test_data = build_scenes(args.test, args.size, args.seed, start=args.train)
    vocab = train_data.pop("vocab")
    test_data.pop("vocab")
    log.info("built %d + %d scenes in %.1fs", args.train, args.test, time.perf_counter() - t0)
    cfg = ModelConfig(
        encoder=args.encoder,
        text_model=args.text_model,
        crf=False,
        post_sigmoid=False,
        post_minmax=False,
        text_dropout=args.text_dropout,
        text_feature=args.text_feature,
        jsm_score=args.jsm_score,
    )
    model = JSMModel(cfg, vocab)
    t1 = time.perf_counter()
    train(
        model,
        train_data,
        args.epochs,
        args.batch,
        args.lr,
        args.joint_text_lr or args.lr,
        args.seed,
    )
    train_text_cached(model, train_data, args.text_epochs, args.batch, args.text_lr, args.seed)
    train_s = time.perf_counter() - t1
    acc_test = text_accuracy(model, test_data, args.batch)
    acc_train = text_accuracy(model, train_data, args.batch)
    upd = update_quality(model, train_data, args.batch, args.margin, args.crf)
    return {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "chance": 1.0 / (len(vocab) - 1),
        "text_only_test": text_only_baselines(train_data, test_data, vocab),
        "text_acc_test": acc_test,
        "text_acc_train": acc_train,
        "update": upd,
    }


def report(res: dict) -> None:
    c = res["config"]
    print(
        f"text signal: encoder={c['encoder']} text={c['text_model']} size={c['size']} "
        f"train={c['train']} test={c['test']} epochs={c['epochs']} lr={c['lr']} "
        f"text_epochs={c['text_epochs']} text_lr={c['text_lr']} feature={c['text_feature']} "
        f"score={c.get('jsm_score', 'word')} "
        f"threads={c['threads']} "
        f"(training {res['train_seconds']}s, total {res['total_seconds']}s)"
    )
    print(
        f"masked-word accuracy  chance {res['chance']:.3f}   text-only guessers on held-out: "
        f"uniform over unnamed words {res['text_only_test']['uniform']:.3f}, "
        f"most frequent unnamed word {res['text_only_test']['prior']:.3f}"
    )
    print(f"  {'visual token from':<22}{'held-out':>10}{'train':>10}")
    for k in (*MAPS, "none_best_word"):
        print(f"  {k:<22}{res['text_acc_test'][k]:>10.3f}{res['text_acc_train'][k]:>10.3f}")
    u = res["update"]
    q = u["w_d_quantiles_10_50_90"]
    print(
        f"JSM weight w_d over {u['n']} training scenes: mean {u['w_d_mean']:.3f} std {u['w_d_std']:.3f} "
        f"(10/50/90%: {q[0]:.3f} {q[1]:.3f} {q[2]:.3f}); favours L_d in {u['frac_favour_candidate']:.1%}, "
        f"L_d better by S in {u['frac_candidate_better']:.1%}"
    )
    print(
        f"update favours the better candidate (S-measure): {u['favours_better_all']:.1%} of all scenes, "
        f"{u['favours_better_decisive']:.1%} of the {u['n_decisive']} with |dS| >= {c['margin']}; "
        f"balanced over the two cases {u['favours_better_balanced']:.1%}; "
        f"ignoring undecided {u['favours_better_ignoring_undecided']:.1%}; "
        f"corr(w_d, S_d - S_g) = {u['corr_wd_vs_Sd_minus_Sg']:.3f}; |w_d - 0.5| < 0.01 (counted as "
        f"wrong) in {u['frac_undecided']:.1%}"
    )
    og, od = u["one_sided_Lg_on_object"], u["one_sided_Ld_on_object"]
    print(
        f"one-sided scenes (one candidate >= 50% of its mass on the object, the other < 30%): "
        f"L_g on object in {og[0]} -> favoured in {og[1]:.1%}; L_d on object in {od[0]} -> "
        f"favoured in {od[1]:.1%}"
    )
    print(f"  {'label':<28}{'S':>8}{'maxF':>8}{'fg>0.5':>8}")
    for name, v in u["label_quality"].items():
        print(f"  {name:<28}{v['S']:>8.4f}{v['maxF']:>8.4f}{v['fg_frac']:>8.4f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=500, help="training scenes")
    p.add_argument("--test", type=int, default=120, help="held-out scenes for text accuracy")
    p.add_argument("--size", type=int, default=128, help="image side, pixels")
    p.add_argument("--epochs", type=int, default=5, help="joint training epochs")
    p.add_argument("--batch", type=int, default=8, help="batch size")
    p.add_argument(
        "--lr",
        type=float,
        default=5e-4,
        help="Adam lr of every network in joint training (reference 1e-4)",
    )
    p.add_argument(
        "--joint-text-lr",
        type=float,
        default=0.0,
        help="text network lr during joint training (0 = --lr; train.text_lr in a run)",
    )
    p.add_argument(
        "--text-epochs",
        type=int,
        default=30,
        help="extra text-only epochs on cached features (0 = off)",
    )
    p.add_argument(
        "--text-feature", default="encoder", help="what the text network reads: encoder | decoder"
    )
    p.add_argument(
        "--jsm-score",
        default="word",
        help="JSM candidate score: word (reference) | word_vs_negative (jsm.candidate_score)",
    )
    p.add_argument("--text-lr", type=float, default=1e-3, help="Adam lr of the text-only epochs")
    p.add_argument(
        "--text-dropout", type=float, default=0.1, help="text network dropout (reference 0.1)"
    )
    p.add_argument(
        "--encoder", default="efficientnet_lite0", help="efficientnet_lite0 | resnet50 | tiny"
    )
    p.add_argument("--text-model", default="tiny", help="tiny | minilm | local folder")
    p.add_argument("--margin", type=float, default=0.02, help="|S_d - S_g| for a 'decisive' scene")
    p.add_argument("--no-crf", dest="crf", action="store_false", help="skip the CRF label row")
    p.add_argument("--seed", type=int, default=0, help="corpus and training seed")
    p.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (machine is shared)"
    )
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    res = run(args)
    report(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
