"""Loader benchmark: our streaming loader vs the reference JSM loader vs the decode limit.

    python -m benchmarks.loader [--samples 384] [--image-size 352] [--workers 2]
                                    [--mode weak|unsupervised|full] ...

One run, same data, same worker count and batch size, measured side by side:

* **reference-style**: a re-implementation of the per-item work of the reference JSM
  training loader (``JSM_weakly/data.py``, ``SalObjDataset``): map-style dataset over
  RGB/ depth/ label folders; per item three pandas lookups in CapS.csv by image name,
  ``torch.load`` of the word-vector file, caption word ids -> (21, 300) features, PIL loads
  of image / label / depth, the un-augmented copies (resize + to-tensor + normalise), the
  same augmentations (flip, centred random crop, p=0.2 bicubic rotation, brightness /
  contrast / colour / sharpness enhancement) and the final resize + to-tensor + normalise.
  torchvision is not installed here, so its Resize/ToTensor/Normalize are written with
  PIL + torch (same operations).
* **ours**: ``make_train_loader`` on shards packed from the same folder (the JPEG bytes are
  stored untouched), as training in model mode ``--mode`` (default ``weak``) runs it
  (default ``DataConfig``): label-store reads, depth normalisation, the default joint
  augmentation (flip, crop, p=0.2 rotation, colour jitter), resize to the train size, ids;
  batches of integer images (the float32 conversion runs on the training device,
  ``batching.to_float``, as ``jsm_dist.train`` does). Only mode ``full`` trains on the
  ground truth, so only there does the loader decode and warp GT masks (``read_gt``);
  ``weak`` / ``unsupervised`` training never reads them (batches carry zero GT,
  ``has_gt`` False). The reference-style loader always loads its label folder.
* **ours, no augment**: the same with augmentation off (shows where the gap to the limit goes).
* **decode limit**: a worker pool that only reads the same shards and decodes RGB + depth
  with the loader's own decoders (``decode.decode_rgb`` / ``decode.decode_depth``: OpenCV,
  the fastest here), nothing else.

Data: a synthetic CapS-style folder (GBK CSV) written by jsm_dist.data.synth, packed with
``jsm-pack caps``. The word-vector file holds the caption vocabulary padded to
``--vocab-size`` words x 300 floats (the size of the real CapS.pt is not published; its
load time grows with it, so the figure is printed).

Each loader runs ``--rounds`` times in interleaved order; the best round of each counts
(the machine may be shared). Two figures per loader: wall-clock samples/s after the first
batch (worker start-up excluded), and CPU milliseconds per sample summed over the main
process and its workers (start-up included; far less sensitive to other jobs on the
machine). Ratios of both are printed.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

log = logging.getLogger(__name__)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


# ---- the reference-style loader ----------------------------------------------------------
def _to_tensor(img: Image.Image) -> torch.Tensor:
    a = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
    a = a[:, :, None] if a.ndim == 2 else a
    return a.permute(2, 0, 1).float().div(255.0)


def _resize(img: Image.Image, size: int) -> Image.Image:
    return img.resize((size, size), Image.BILINEAR)


def _flip(img, label, depth):
    if random.randint(0, 1) == 1:
        t = Image.FLIP_LEFT_RIGHT
        return img.transpose(t), label.transpose(t), depth.transpose(t)
    return img, label, depth


def _crop(img, label, depth):
    border = 30
    w, h = img.size
    cw, ch = np.random.randint(w - border, w), np.random.randint(h - border, h)
    box = ((w - cw) >> 1, (h - ch) >> 1, (w + cw) >> 1, (h + ch) >> 1)
    return img.crop(box), label.crop(box), depth.crop(box)


def _rotate(img, label, depth):
    if random.random() > 0.8:
        angle = np.random.randint(-15, 15)
        return (x.rotate(angle, Image.BICUBIC) for x in (img, label, depth))
    return img, label, depth


def _enhance(img):
    img = ImageEnhance.Brightness(img).enhance(random.randint(5, 15) / 10.0)
    img = ImageEnhance.Contrast(img).enhance(random.randint(5, 15) / 10.0)
    img = ImageEnhance.Color(img).enhance(random.randint(0, 20) / 10.0)
    return ImageEnhance.Sharpness(img).enhance(random.randint(0, 30) / 10.0)


class ReferenceStyleDataset(Dataset):
    """Per-item work of the reference ``SalObjDataset`` (see the module docstring)."""

    def __init__(self, folder: Path, label_dir: str, train_size: int, vocab: dict[str, int]):
        import pandas as pd

        self.folder, self.size, self.vocab = folder, train_size, vocab
        self.images = sorted((folder / "RGB").glob("*.jpg"))
        self.labels = [folder / label_dir / f"{p.stem}.png" for p in self.images]
        self.depths = [folder / "depth" / f"{p.stem}.png" for p in self.images]
        self.df = pd.read_csv(folder / "CapS.csv", encoding="gbk")

    def __len__(self) -> int:
        return len(self.images)

    def _img(self, img: Image.Image) -> torch.Tensor:
        return (_to_tensor(_resize(img, self.size)) - MEAN) / STD

    def __getitem__(self, i: int):
        name = self.images[i].name
        df = self.df
        caption = df.loc[df["Image"] == name, "Caption"].values[0]
        word = df.loc[df["Image"] == name, "Semantic"].values[0]
        position = df.loc[df["Image"] == name, "Position"].values[0]
        vocab = torch.load(self.folder / "CapS.pt")  # every item, as the reference does
        ids = [vocab["word2id"][w] for w in caption.strip().split()][:20]
        ids += [0] * (20 - len(ids))
        cap_feat = torch.stack([vocab["id2vec"][0]] + [vocab["id2vec"][k] for k in ids], dim=0)
        sem_feat = vocab["id2vec"][vocab["word2id"][word]]
        cls = torch.tensor(self.vocab.get(word.lower(), 0)).long()
        with open(self.images[i], "rb") as f:
            image = Image.open(f).convert("RGB")
        with open(self.labels[i], "rb") as f:
            label = Image.open(f).convert("L")
        with open(self.depths[i], "rb") as f:
            depth = Image.open(f).convert("L")
        ori = [
            self._img(image),
            _to_tensor(_resize(label, self.size)),
            _to_tensor(_resize(depth, self.size)),
        ]
        image, label, depth = _flip(image, label, depth)
        image, label, depth = _crop(image, label, depth)
        image, label, depth = _rotate(image, label, depth)
        image = _enhance(image)
        out = (
            self._img(image),
            _to_tensor(_resize(label, self.size)),
            _to_tensor(_resize(depth, self.size)),
        )
        return (
            *out,
            [str(self.images[i]), str(self.labels[i])],
            [*ori, cap_feat, int(position)],
            [cap_feat, sem_feat, int(position), cls, torch.tensor(0)],
        )


def write_word_vectors(folder: Path, vocab_size: int, dim: int = 300) -> int:
    """CapS.pt: {"word2id", "id2vec"} over every caption word, padded to ``vocab_size``."""
    import pandas as pd

    df = pd.read_csv(folder / "CapS.csv", encoding="gbk")
    words = sorted({w for c in df["Caption"] for w in str(c).split()} | set(df["Semantic"]))
    words += [f"<pad{i}>" for i in range(max(0, vocab_size - 1 - len(words)))]
    word2id = {w: i + 1 for i, w in enumerate(words)}  # 0 = unknown, zero vector
    vecs = torch.randn(len(words) + 1, dim, generator=torch.Generator().manual_seed(0))
    vecs[0] = 0
    torch.save({"word2id": word2id, "id2vec": vecs}, folder / "CapS.pt")
    return (folder / "CapS.pt").stat().st_size


# ---- the decode limit ---------------------------------------------------------------------
class DecodeOnly(IterableDataset):
    """Read the shards (split by worker) and decode RGB + depth; yield a count per batch."""

    def __init__(self, paths: list[str], batch: int) -> None:
        super().__init__()
        self.paths, self.batch = paths, batch

    def __iter__(self):
        import webdataset as wds

        from jsm_dist.data.decode import decode_depth, decode_rgb

        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        n = 0
        for raw in wds.tarfile_to_samples()(iter([{"url": u} for u in self.paths[wid::nw]])):
            decode_rgb(raw.get("rgb.jpg") or raw["rgb.png"])
            decode_depth(raw["depth.png"])
            n += 1
            if n == self.batch:
                yield n
                n = 0
        if n:
            yield n


# ---- measuring ------------------------------------------------------------------------------
def _cpu_seconds() -> float:
    """CPU time of this process and of its finished (joined) children, user + system."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _measure(make, count) -> tuple[float, float, int]:
    """-> (samples/s after the first batch, CPU ms per sample, samples).

    Wall throughput excludes worker start-up (the first batch). CPU time covers the whole
    iteration in this process and its workers (joined at the end, so RUSAGE_CHILDREN
    includes them): it is what the loader costs, and it is far less sensitive than wall
    time to other jobs sharing the machine.
    """
    gc.collect()
    cpu0 = _cpu_seconds()
    batches = make()
    it = iter(batches)
    n = count(next(it))
    t0 = time.perf_counter()
    n_timed = 0
    for b in it:
        n_timed += count(b)
    dt = time.perf_counter() - t0
    del it, batches, b
    gc.collect()  # DataLoader iterators join their workers when collected
    cpu = _cpu_seconds() - cpu0
    total = n + n_timed
    return (n_timed / dt if dt > 0 else float("nan")), 1000.0 * cpu / total, total


def prepare(work: Path, args) -> tuple[Path, Path, dict]:
    from jsm_dist.data import pack, synth
    from jsm_dist.data.corpus import Corpus

    folder, corpus_dir = work / "caps", work / "corpus"
    if not (folder / "CapS.pt").exists():
        cfg = synth.SynthConfig(num_samples=args.samples, image_size=args.image_size, seed=0)
        synth.write_caps_folder(cfg, folder, encoding="gbk", workers=args.workers, quality=90)
        write_word_vectors(folder, args.vocab_size)
    if not (corpus_dir / "corpus.json").exists():
        rc = pack.main(
            [
                "caps",
                "--input",
                str(folder),
                "--out",
                str(corpus_dir),
                "--overwrite",
                "--workers",
                str(args.workers),
                "--samples-per-shard",
                str(max(1, args.samples // (4 * args.workers))),
                "--no-progress",
            ]
        )
        if rc != 0:
            raise RuntimeError("packing the benchmark corpus failed")
    corpus = Corpus.load(corpus_dir)
    return folder, corpus_dir, corpus.word_to_class


def run(args) -> dict[str, float]:
    from jsm_dist.data.corpus import Corpus
    from jsm_dist.data.stream import DataConfig, make_train_loader
    from jsm_dist.dist import WorldInfo

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="jsm-bench-"))
    try:
        folder, corpus_dir, vocab = prepare(work, args)
        corpus = Corpus.load(corpus_dir)
        pt_mb = (folder / "CapS.pt").stat().st_size / 2**20
        cfg = DataConfig(
            train_size=args.train_size,
            batch_size=args.batch_size,
            num_workers=args.workers,
            shuffle_buffer=64,
        )
        b, w = args.batch_size, args.workers

        def reference():
            ds = ReferenceStyleDataset(folder, "GT", args.train_size, vocab)
            return DataLoader(ds, batch_size=b, shuffle=True, num_workers=w, drop_last=True)

        read_gt = args.mode == "full"  # as jsm_dist.train sets it: GT only trains mode full

        def ours():
            return make_train_loader(
                corpus, cfg, epoch=0, seed=0, world=WorldInfo(), read_gt=read_gt
            )

        def ours_no_aug():  # where the gap to the decode limit goes: augmentation or the rest
            plain = DataConfig(**{**vars(cfg), "augment": False})
            return make_train_loader(
                corpus, plain, epoch=0, seed=0, world=WorldInfo(), read_gt=read_gt
            )

        def decode_limit():
            return DataLoader(DecodeOnly(corpus.shard_paths, b), batch_size=None, num_workers=w)

        runs = {
            "reference-style": (reference, lambda x: x[0].shape[0]),
            "ours": (ours, lambda x: x["rgb"].shape[0]),
            "ours, no augment": (ours_no_aug, lambda x: x["rgb"].shape[0]),
            "decode limit": (decode_limit, lambda x: x),
        }
        rate: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for r in range(args.rounds):
            for name, (make, count) in runs.items():
                sps, ms, n = _measure(make, count)
                log.info(
                    "round %d %-16s %8.1f samples/s  %6.2f CPU ms/sample  (%d samples)",
                    r,
                    name,
                    sps,
                    ms,
                    n,
                )
                rate[name] = max(rate.get(name, 0.0), sps)
                cpu[name] = min(cpu.get(name, float("inf")), ms)
        print(
            f"\nloader benchmark: {args.samples} samples {args.image_size}px -> train size "
            f"{args.train_size}, batch {b}, workers {w}, best of {args.rounds} interleaved rounds; "
            f"CapS.pt {pt_mb:.2f} MiB ({args.vocab_size} words x 300)\n"
            f"ours = the training loader as model.mode={args.mode} runs it "
            f"(GT masks {'decoded and warped' if read_gt else 'not read: unused by this mode'})"
        )
        print(f"{'loader':<20}{'samples/s (wall)':>18}{'CPU ms/sample':>15}{'samples/CPU-s':>15}")
        for name in runs:
            print(f"{name:<20}{rate[name]:>18.1f}{cpu[name]:>15.2f}{1000 / cpu[name]:>15.1f}")
        out = {"rate": rate, "cpu_ms": cpu}
        for label, ref, lim in (
            ("wall", rate["ours"] / rate["reference-style"], rate["ours"] / rate["decode limit"]),
            ("CPU ", cpu["reference-style"] / cpu["ours"], cpu["decode limit"] / cpu["ours"]),
        ):
            print(
                f"[{label}] ours / reference-style = {ref:.2f}x (target >= 3x);  "
                f"ours / decode limit = {lim:.0%} (target >= 70%)"
            )
            out[label.strip()] = {"vs_reference": ref, "vs_decode_limit": lim}
        return out
    finally:
        if not args.work_dir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.loader", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--samples", type=int, default=384, help="synthetic scenes in the corpus")
    p.add_argument("--image-size", type=int, default=352, help="stored image side, pixels")
    p.add_argument("--train-size", type=int, default=352, help="batch image side (reference: 352)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch")
    p.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="loader worker processes, the same for every loader",
    )
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; best one counts")
    p.add_argument(
        "--mode",
        choices=("weak", "unsupervised", "full"),
        default="weak",
        help="model mode whose training loader is measured (only full reads GT masks)",
    )
    p.add_argument("--vocab-size", type=int, default=2000, help="words in the CapS.pt file")
    p.add_argument("--work-dir", default="", help="keep/reuse data here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="do not delete the temp data dir")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
