"""How often does the per-sample depth-orientation rule agree with the ground truth?

``python -m benchmarks.depth_orientation [--real tests/data/real] [--synth 300]
[--sizes 64,128,256] [--crops]``

Every sample is tested in both orientations: as stored, and flipped (valid values
mirrored within their range, holes kept); the rule must follow the flip. The reference
("truth") is the orientation the ground truth implies (:func:`orientation.gt_implied`:
the GT object is nearer than a ring around it). Real sources without GT take the
orientation recorded by inspection in ``<real>/inspected_orientation.json``.

Columns: the rule's agreement and uncertain count, then each cue alone (sign of the cue),
including two candidates that were measured and left out of the rule (centre vs border,
histogram mode), and how many decisions flipped with the depth. ``--crops`` adds rows for
crops around the GT object (25% margin): close-ups, where less of the ground plane shows;
``--rotate`` adds the images turned by 90 degrees: no ground plane along the rows at all
(a stress test of the object cue; benchmark images are upright).
Prints a Markdown table (the one in docs/depth_orientation.md) and the rule's time per
sample.

Real samples: ``<real>/<SOURCE>/{RGB,depth,GT}/`` (tests/data/real/SOURCES.md says where
each comes from). Synthetic scenes: jsm_dist.data.synth, near_is_large by construction,
``--synth`` scenes per size in ``--sizes``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jsm_dist import schema
from jsm_dist.data import decode, orientation, sources
from jsm_dist.data.synth import SynthConfig, generate

log = logging.getLogger(__name__)

INSPECTED_FILE = "inspected_orientation.json"
CUES = ("ground", "object", "centre_border", "hist_mode")


# ---- candidate cues measured but left out of the rule ---------------------------------
def centre_border(d: np.ndarray) -> float:
    """Mean depth of the central half minus the border band (> 0: centre larger)."""
    h, w = d.shape
    b = max(1, round(0.1 * min(h, w)))
    border = np.zeros((h, w), bool)
    border[:b], border[-b:], border[:, :b], border[:, -b:] = True, True, True, True
    centre = np.zeros((h, w), bool)
    centre[h // 4 : h - h // 4, w // 4 : w - w // 4] = True
    return float(np.nanmean(d[centre]) - np.nanmean(d[border]))


def hist_mode(d: np.ndarray) -> float:
    """0.5 - the histogram mode (16 bins): the mode is taken to be the far background."""
    vals = d[~np.isnan(d)]
    hist, _ = np.histogram(vals, bins=16, range=(0.0, 1.0))
    return float(0.5 - (np.argmax(hist) + 0.5) / 16)


def cue_scores(rgb: np.ndarray, depth: np.ndarray) -> dict[str, float]:
    d = orientation.valid_depth(depth)
    return {
        "ground": orientation.ground_cue(d),
        "object": orientation.object_cue(d, orientation.object_mask(rgb)),
        "centre_border": centre_border(d),
        "hist_mode": hist_mode(d),
    }


# ---- samples -----------------------------------------------------------------------------
def real_samples(root: Path) -> Iterator[tuple]:
    """(source, name, rgb, depth, truth, gt or None) per real sample; truth from the GT,
    else the source's orientation by inspection."""
    inspected = {}
    if (root / INSPECTED_FILE).is_file():
        inspected = json.loads((root / INSPECTED_FILE).read_text())
    for src in sorted(p for p in root.iterdir() if p.is_dir()):
        rgb_dir = sources._find_dir(src, sources.RGB_DIRS)
        depth_dir = sources._find_dir(src, sources.DEPTH_DIRS)
        gt_dir = sources._find_dir(src, sources.GT_DIRS)
        depths = sources._index_by_stem(depth_dir, decode.DEPTH_SUFFIXES)
        gts = sources._index_by_stem(gt_dir, decode.IMAGE_SUFFIXES)
        for stem, path in sources._index_by_stem(rgb_dir, decode.IMAGE_SUFFIXES).items():
            rgb, _ = decode.load_rgb_file(path)
            depth = decode.load_depth_file(depths[stem])
            gt = decode.load_gray_file(gts[stem]) if stem in gts else None
            truth = orientation.gt_implied(depth, gt) if gt is not None else inspected.get(src.name)
            yield src.name, stem, rgb, depth, truth, gt


def synth_samples(num: int, sizes: list[int]) -> Iterator[tuple]:
    for k, size in enumerate(sizes):
        cfg = SynthConfig(num_samples=num, image_size=size, seed=100 + k)
        for s in generate(cfg):
            truth = orientation.gt_implied(s["depth"], s["gt"])
            yield f"synthetic {size}px", s["key"], s["rgb"], s["depth"], truth, s["gt"]


def object_crop(rgb, depth, gt, pad: float = 0.25):
    """The GT object's bounding box grown by ``pad`` of its size on each side."""
    ys, xs = np.nonzero(gt > 128)
    if not len(ys):
        return None
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    y0, y1 = max(0, int(ys.min() - pad * h)), min(gt.shape[0], int(ys.max() + pad * h) + 1)
    x0, x1 = max(0, int(xs.min() - pad * w)), min(gt.shape[1], int(xs.max() + pad * w) + 1)
    return rgb[y0:y1, x0:x1], depth[y0:y1, x0:x1], gt[y0:y1, x0:x1]


# ---- the table -----------------------------------------------------------------------------
def flip_truth(truth: str) -> str:
    return schema.FAR_IS_LARGE if truth == schema.NEAR_IS_LARGE else schema.NEAR_IS_LARGE


def measure(samples, crops: bool = False, rotate: bool = False) -> tuple[dict, float]:
    """Per source: counts of tests, rule agreements, uncertain, cue agreements, flips."""
    rows: dict[str, dict] = defaultdict(lambda: defaultdict(int))
    seconds, decided = 0.0, 0
    for src, name, rgb, depth, truth, gt in samples:
        variants = [(src, rgb, depth, truth)]
        if crops and gt is not None:
            cut = object_crop(rgb, depth, gt)
            if cut is not None and (cut[1] > 0).any():
                variants.append((f"{src}, object crop", *cut[:2], orientation.gt_implied(*cut[1:])))
        if rotate:  # no ground plane along the rows any more: the object cue must carry
            variants.append((f"{src}, turned 90°", np.rot90(rgb), np.rot90(depth), truth))
        for row, r, d, t in variants:
            if t is None:  # the GT implies nothing (object and ring at equal depth)
                rows[row]["no_truth"] += 1
                continue
            rows[row]["samples"] += 1
            decisions = []
            for flipped in (False, True):
                dd = orientation.flip_depth(d) if flipped else d
                tt = flip_truth(t) if flipped else t
                start = time.perf_counter()
                found = orientation.detect(r, dd)
                seconds += time.perf_counter() - start
                decided += 1
                decisions.append(found.convention)
                stats = rows[row]
                stats["tests"] += 1
                stats["agree"] += found.convention == tt
                stats["uncertain"] += found.uncertain
                for cue, value in cue_scores(r, dd).items():
                    says = schema.NEAR_IS_LARGE if value > 0 else schema.FAR_IS_LARGE
                    stats[cue] += value != 0 and says == tt
            rows[row]["flipped"] += decisions[0] != decisions[1]
    return rows, 1000.0 * seconds / max(decided, 1)


def markdown(rows: dict) -> str:
    head = (
        "| source | samples | tests | rule agrees with GT | uncertain | ground alone "
        "| object alone | centre vs border | histogram mode | decision flips with depth |"
    )
    lines = [head, "|" + "---|" * 10]

    def pct(k: int, n: int) -> str:
        return f"{100.0 * k / n:.1f}% ({k}/{n})" if n else "-"

    for src, s in rows.items():
        n = s["tests"]
        lines.append(
            f"| {src} | {s['samples']} | {n} | {pct(s['agree'], n)} | {s['uncertain']} | "
            + " | ".join(pct(s[c], n) for c in CUES)
            + f" | {s['flipped']}/{s['samples']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real", default="tests/data/real", help="real samples: <dir>/<SOURCE>/...")
    p.add_argument("--synth", type=int, default=300, help="synthetic scenes per size (0: none)")
    p.add_argument("--sizes", default="64,128,256", help="synthetic scene sides, comma-separated")
    p.add_argument("--crops", action="store_true", help="also test crops around the GT object")
    p.add_argument("--rotate", action="store_true", help="also test images turned by 90 degrees")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    real = Path(args.real)
    if not real.is_dir():
        raise SystemExit(f"--real {real} is not a folder (tests/data/real in a checkout)")

    def everything():
        yield from real_samples(real)
        if args.synth:
            yield from synth_samples(args.synth, [int(s) for s in args.sizes.split(",")])

    rows, ms = measure(everything(), crops=args.crops, rotate=args.rotate)
    print(markdown(rows))
    skipped = {src: s["no_truth"] for src, s in rows.items() if s["no_truth"]}
    if skipped:
        print(f"\nwithout a GT-implied orientation (not counted): {skipped}")
    print(f"\nrule: {ms:.1f} ms per decision (one process, this machine)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
