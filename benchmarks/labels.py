"""Benchmark the label store against the reference JSM label handling, side by side.

    python -m benchmarks.labels [--samples 512] [--crf-samples 8] [--size 256]

Writes (time per refined label, all in this run, same labels):
  store      LabelStore writer + close (fsync, checksums) + commit (manifest, fsyncs),
             the commit amortised over the samples
  png        one PNG per label (no fsync: what the reference does)
  png+crf    the reference: PNG, then one ``python -c`` subprocess per image running the
             dense CRF (pydensecrf2) on that PNG and its RGB image, writing the result PNG
Reads (random sample order, warm page cache for both): store.read vs PIL decode of PNGs.
Peak RSS: a child process reading every label of a 2k- and a 20k-sample store (64x64).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# The reference's post-processing, run once per image in its own interpreter (docs/method.md):
# unary -log(p) / (1.05 sigmoid(p)), Gaussian sxy 3 compat 3, bilateral sxy 60 srgb 5
# compat 5, one mean-field iteration.
CRF_SCRIPT = r"""
import sys
import numpy as np
from PIL import Image
import pydensecrf.densecrf as dcrf
rgb = np.array(Image.open(sys.argv[1]).convert("RGB"))  # writable, C-contiguous
p = np.asarray(Image.open(sys.argv[2]).convert("L"), dtype=np.float32) / 255.0
h, w = p.shape
probs = np.clip(np.stack([1.0 - p, p]), 1e-5, 1.0)
unary = -np.log(probs) / (1.05 / (1.0 + np.exp(-probs)))
d = dcrf.DenseCRF2D(w, h, 2)
d.setUnaryEnergy(np.ascontiguousarray(unary.reshape(2, -1), dtype=np.float32))
d.addPairwiseGaussian(sxy=3, compat=3)
d.addPairwiseBilateral(sxy=60, srgb=5, rgbim=rgb, compat=5)
q = np.array(d.inference(1)).reshape(2, h, w)
Image.fromarray((q[1] * 255).astype(np.uint8)).save(sys.argv[3])
"""

RSS_SCRIPT = """
import sys
import numpy as np
from jsm_dist.labels import LabelStore
st = LabelStore.open(sys.argv[1])
for s, n in enumerate(st.shard_sizes):
    for lo in range(0, n, 64):
        idx = range(lo, min(n, lo + 64))
        st.read_many([s] * len(idx), idx)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
import resource
print(hwm, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def synth_labels(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Soft elliptic saliency blobs (uint8 (n, s, s)) and matching RGB images (n, s, s, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    labels = np.empty((n, size, size), np.uint8)
    rgbs = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        cy, cx, ry, rx = rng.uniform(0.3, 0.7, 2).tolist() + rng.uniform(0.1, 0.3, 2).tolist()
        r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        soft = 1 / (1 + np.exp(np.minimum((r - 1) * 6, 50))) + rng.normal(0, 0.03, r.shape)
        labels[i] = np.rint(np.clip(soft, 0, 1) * 255)
        base = (
            rng.integers(0, 256, 3) * (1 - soft[..., None])
            + rng.integers(0, 256, 3) * soft[..., None]
        )
        rgbs[i] = np.clip(base + rng.normal(0, 12, base.shape), 0, 255)
    return labels, rgbs


def bench_store_write(
    root: Path, labels: np.ndarray, shards: int, batch: int
) -> tuple[float, float]:
    """(seconds per label for the whole generation, seconds of close() + commit() alone)."""
    from jsm_dist.labels import LabelStore

    n = len(labels)
    sizes = [len(a) for a in np.array_split(np.arange(n), shards)]
    store = LabelStore.create(root, sizes, labels.shape[1:])
    conf = np.full((batch, 2), 0.5, np.float32)
    t0 = time.perf_counter()
    w = store.writer(0)
    start = 0
    for s, size in enumerate(sizes):
        for lo in range(0, size, batch):
            hi = min(size, lo + batch)
            w.write(s, range(lo, hi), labels[start + lo : start + hi], conf[: hi - lo])
        start += size
    t1 = time.perf_counter()
    w.close()
    store.commit(0)
    t2 = time.perf_counter()
    return (t2 - t0) / n, t2 - t1


def bench_png_write(out: Path, labels: np.ndarray) -> float:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i, lab in enumerate(labels):
        Image.fromarray(lab).save(out / f"{i:06d}.png")
    return (time.perf_counter() - t0) / len(labels)


def bench_png_crf(out: Path, labels: np.ndarray, rgbs: np.ndarray) -> float:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    for i, rgb in enumerate(rgbs):  # the dataset's images exist beforehand: not timed
        Image.fromarray(rgb).save(out / f"{i:06d}.rgb.png")
    t0 = time.perf_counter()
    for i, lab in enumerate(labels):
        label_png = out / f"{i:06d}.png"
        Image.fromarray(lab).save(label_png)
        subprocess.run(
            [
                sys.executable,
                "-c",
                CRF_SCRIPT,
                str(out / f"{i:06d}.rgb.png"),
                str(label_png),
                str(label_png),
            ],
            check=True,
        )
    return (time.perf_counter() - t0) / len(labels)


def bench_reads(store_root: Path, png_dir: Path, n: int, reads: int) -> tuple[float, float, float]:
    from PIL import Image

    from jsm_dist.labels import LabelStore

    store = LabelStore.open(store_root)
    rng = np.random.default_rng(1)
    flat = rng.integers(0, n, reads)
    shard_of = np.repeat(np.arange(store.num_shards), store.shard_sizes)
    start = np.concatenate([[0], np.cumsum(store.shard_sizes)[:-1]])
    shards, idx = shard_of[flat], flat - start[shard_of[flat]]
    store.read(0, 0)  # open one descriptor outside the timing, as a warm worker would have
    t0 = time.perf_counter()
    for s, i in zip(shards.tolist(), idx.tolist()):
        store.read(s, i)
    t_store = (time.perf_counter() - t0) / reads
    t0 = time.perf_counter()
    for lo in range(0, reads, 32):
        store.read_many(shards[lo : lo + 32], idx[lo : lo + 32])
    t_batch = (time.perf_counter() - t0) / reads
    t0 = time.perf_counter()
    for i in flat.tolist():
        np.asarray(Image.open(png_dir / f"{i:06d}.png"))
    t_png = (time.perf_counter() - t0) / reads
    return t_store, t_batch, t_png


def bench_rss(work: Path, counts: tuple[int, ...] = (2_000, 20_000)) -> list[tuple[int, int, int]]:
    from jsm_dist.labels import LabelStore

    out = []
    for n in counts:
        shard = 2_000
        st = LabelStore.create(work / f"rss{n}", [shard] * (n // shard), (64, 64))
        block = np.full((shard, 64, 64), 1, np.uint8)
        with st.writer(0) as w:
            for s in range(st.num_shards):
                w.write(s, range(shard), block)
        st.commit(0)
        res = subprocess.run(
            [sys.executable, "-c", RSS_SCRIPT, str(st.root)],
            capture_output=True,
            text=True,
            check=True,
        )
        hwm, maxrss = (int(v) for v in res.stdout.split())
        out.append((n, hwm, maxrss))
        shutil.rmtree(st.root)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.labels", description=__doc__.split("\n")[0]
    )
    ap.add_argument(
        "--samples",
        type=int,
        default=512,
        help="labels written/read by store and png (default 512)",
    )
    ap.add_argument(
        "--crf-samples", type=int, default=8, help="labels through PNG + CRF subprocess (default 8)"
    )
    ap.add_argument(
        "--size", type=int, default=256, help="label side in pixels (default 256, the CRF size)"
    )
    ap.add_argument("--shards", type=int, default=4, help="label shards in the store (default 4)")
    ap.add_argument(
        "--batch", type=int, default=16, help="samples per writer.write call (default 16)"
    )
    ap.add_argument(
        "--reads", type=int, default=4000, help="random reads timed per method (default 4000)"
    )
    ap.add_argument("--skip-rss", action="store_true", help="skip the peak-RSS measurement")
    ap.add_argument(
        "--workdir", type=Path, default=None, help="scratch directory (default: a temp dir)"
    )
    args = ap.parse_args(argv)
    for name in ("samples", "crf_samples", "size", "shards", "batch", "reads"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-labels-", dir=args.workdir))
    try:
        labels, rgbs = synth_labels(max(args.samples, args.crf_samples), args.size)
        t_store, t_commit = bench_store_write(
            work / "store", labels[: args.samples], args.shards, args.batch
        )
        t_png = bench_png_write(work / "png", labels[: args.samples])
        t_crf = bench_png_crf(work / "crf", labels[: args.crf_samples], rgbs[: args.crf_samples])
        r_store, r_batch, r_png = bench_reads(
            work / "store", work / "png", args.samples, args.reads
        )
        rss = [] if args.skip_rss else bench_rss(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def row(name, t, ref, target=None):
        ratio = ref / t
        mark = (
            ""
            if target is None
            else f"  target >= {target}x: {'PASS' if ratio >= target else 'FAIL'}"
        )
        print(f"  {name:<34} {t * 1e6:>10.1f} us   {ratio:>8.1f}x{mark}")

    print(
        f"label store benchmark: {args.samples} labels {args.size}x{args.size} uint8, {args.shards} shards"
    )
    print("writes (time per label; ratio = reference time / this time)")
    row("png + crf subprocess (reference)", t_crf, t_crf)
    row("png only", t_png, t_crf)
    row("store (write+fsync+commit)", t_store, t_crf, 50)
    row("store vs png only", t_store, t_png, 5)
    print(f"  (store: close + commit {t_commit * 1e3:.1f} ms in all, included above)")
    print(f"random reads ({args.reads}, warm page cache)")
    row("png decode", r_png, r_png)
    row("store.read", r_store, r_png, 5)
    row("store.read_many (batch 32)", r_batch, r_png, 5)
    if rss:
        (n0, h0, m0), (n1, h1, m1) = rss
        print("peak RSS of a process reading every label (64x64)")
        print(f"  {n0:>6} samples: VmHWM {h0 / 1024:.1f} MiB (ru_maxrss {m0 / 1024:.1f} MiB)")
        print(f"  {n1:>6} samples: VmHWM {h1 / 1024:.1f} MiB (ru_maxrss {m1 / 1024:.1f} MiB)")
        print(
            "  (ru_maxrss carries this parent's high-water mark across exec: VmHWM is the child's own)"
        )
        verdict = "PASS" if h1 <= 1.10 * h0 else "FAIL"
        print(f"  ratio {h1 / h0:.3f}  target <= 1.10: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
