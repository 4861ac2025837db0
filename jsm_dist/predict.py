"""RGB-only saliency prediction: ``jsm-predict`` / ``python -m jsm_dist.predict``.

    jsm-predict --model runs/x/model.pt --input data/test/NLPR --out results/JSM/NLPR
    accelerate launch --num_processes 4 -m jsm_dist.predict --model ... --input ... --out ...

Inputs (depth and captions are never needed): a folder of images (a benchmark folder with an
``RGB`` subfolder is understood), a list file (one image path per line, relative paths
resolved against the list's folder, ``#`` comments), or a packed corpus (a folder with
``corpus.json``: the ``rgb`` member of each sample is read by byte offset, and the small
``json`` member for the sample's original name, which names its map, so ``jsm-eval``
matches the maps to the benchmark's own GT file names whatever the shard keys).

Stages: list inputs -> (this rank's share: items[rank::world]) -> DataLoader workers decode
and resize to ``size`` x ``size`` (PIL bilinear, as the reference test loader; by default
the training size recorded in the model file) -> batched ``model.predict`` -> each map
resized back to its image's original size -> ``<name>.png`` (8-bit). Under ``accelerate
launch`` / torchrun every process takes its share of the list (``jsm_dist.dist.world_info``)
and its own GPU; no collective is needed since each writes different files.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jsm_dist import schema
from jsm_dist.data.corpus import Corpus
from jsm_dist.dist import WorldInfo, world_info
from jsm_dist.models import load_model

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
RGB_DIR_NAMES = ("rgb", "image", "images", "test_images", "imgs")
DEFAULT_SIZE = 352  # the reference JSM test size


@dataclass
class PredictConfig:
    """Settings of a prediction run."""

    size: int | None = None  # square network input side, pixels (None: model_input_size)
    batch_size: int = 8  # images per forward pass
    num_workers: int = 0  # DataLoader decode workers (0 = in the main process)
    device: str = (
        "auto"  # "auto" (cuda:<local_rank> when available, else cpu) | "cpu" | "cuda:0" ...
    )
    minmax: bool = False  # per-image min-max stretch before saving (reference demo_test)
    progress: bool = True  # tqdm bar on the main process

    def __post_init__(self) -> None:
        if self.size is not None and self.size < 8:
            raise ValueError(f"PredictConfig.size must be >= 8, got {self.size}")
        if self.batch_size < 1:
            raise ValueError(f"PredictConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"PredictConfig.num_workers must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class Item:
    """One input image: a file, or a byte range inside a tar shard."""

    name: str  # output stem: <out>/<name>.png
    path: str  # image file, or the tar shard holding it
    offset: int = -1  # byte offset of the member's data in the shard (-1: a plain file)
    size: int = 0  # member size in bytes


# ---------------------------------------------------------------- listing inputs
def _sample_name(meta: bytes, key: str) -> str:
    """The sample's original name (json ``name``: the packed file's stem), so maps match the
    benchmark's GT file names; the key when the json has none (or an unusable one)."""
    try:
        name = json.loads(meta).get("name")
    except (ValueError, AttributeError):
        name = None
    if isinstance(name, str) and name and name not in (".", "..") and Path(name).name == name:
        return name
    return key.replace("/", "_")


def _shard_items(corpus_dir: Path) -> list[Item]:

    items = []
    for shard in Corpus.load(corpus_dir).shard_paths:
        rgb: dict[str, tarfile.TarInfo] = {}
        metas: dict[str, bytes] = {}
        with tarfile.open(shard) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                if not m.isfile():
                    continue
                if ext.lower() in (schema.MEMBER_RGB_JPG, "rgb.jpeg", schema.MEMBER_RGB_PNG):
                    rgb[key] = m
                elif ext == schema.MEMBER_META:  # a few hundred bytes; depth and GT are never read
                    metas[key] = tar.extractfile(m).read()
        items += [
            Item(_sample_name(metas.get(key, b"{}"), key), shard, m.offset_data, m.size)
            for key, m in rgb.items()
        ]
    return items


def list_inputs(source: str | os.PathLike) -> list[Item]:
    """The images of a folder, a list file or a packed corpus (see the module docstring)."""
    src = Path(source)
    if src.is_dir() and (src / "corpus.json").is_file():
        items = _shard_items(src)
    elif src.is_dir():
        sub = [d for d in sorted(src.iterdir()) if d.is_dir() and d.name.lower() in RGB_DIR_NAMES]
        folder = sub[0] if sub else src
        files = sorted(
            p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
        )
        items = [Item(p.stem, str(p)) for p in files]
    elif src.is_file():
        items = []
        for line in src.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                p = Path(line) if Path(line).is_absolute() else src.parent / line
                items.append(Item(p.stem, str(p)))
    else:
        raise FileNotFoundError(f"input {src} is neither a folder, a list file nor a corpus")
    if not items:
        raise FileNotFoundError(f"no images found in {src} (extensions {IMAGE_EXTS})")
    seen: dict[str, str] = {}
    clashes = []
    for it in items:
        if it.name in seen:
            clashes.append(f"{seen[it.name]} / {it.path}")
        seen[it.name] = it.path
    if clashes:
        raise ValueError(
            f"{len(clashes)} inputs would write the same <name>.png, e.g. {clashes[:3]}: rename them"
        )
    return items


def read_rgb(item: Item) -> np.ndarray:
    """uint8 (H, W, 3) of one item."""
    import io

    from PIL import Image

    if item.offset < 0:
        im = Image.open(item.path)
    else:
        with open(item.path, "rb") as fh:
            fh.seek(item.offset)
            im = Image.open(io.BytesIO(fh.read(item.size)))
    with im:
        return np.asarray(im.convert("RGB"))


class _Images:
    """Map-style dataset: index -> {"i", "rgb" (3, S, S) float in [0,1], "hw"} or {"i", "error"}."""

    def __init__(self, items: Sequence[Item], size: int):
        self.items, self.size = items, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        import torch
        from PIL import Image

        try:
            rgb = read_rgb(self.items[i])
        except (OSError, ValueError, SyntaxError) as exc:  # counted and reported, never fatal
            return {"i": i, "error": f"{type(exc).__name__}: {exc}"}
        h, w = rgb.shape[:2]
        small = np.asarray(Image.fromarray(rgb).resize((self.size, self.size), Image.BILINEAR))
        return {
            "i": i,
            schema.RGB: torch.from_numpy(small.copy()).permute(2, 0, 1).float() / 255,
            "hw": (h, w),
        }


def _collate(samples: list[dict]) -> dict:
    import torch

    good = [s for s in samples if schema.RGB in s]
    return {
        "i": [s["i"] for s in good],
        "hw": [s["hw"] for s in good],
        schema.RGB: torch.stack([s[schema.RGB] for s in good]) if good else None,
        "errors": [(s["i"], s["error"]) for s in samples if "error" in s],
    }


# ---------------------------------------------------------------- prediction
def pick_device(spec: str, world: WorldInfo):
    import torch

    if spec == "auto":
        return torch.device(f"cuda:{world.local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def to_png_map(prob, hw: tuple[int, int], minmax: bool) -> np.ndarray:
    """(1, 1, S, S) probabilities -> uint8 (H, W) at the original size (bilinear)."""
    import torch
    import torch.nn.functional as F

    up = F.interpolate(prob.float(), size=hw, mode="bilinear", align_corners=False)[0, 0]
    up = up.clamp(0, 1)
    if minmax:  # the reference demo_test stretches each map to [0, 1]
        up = (up - up.min()) / (up.max() - up.min() + 1e-8)
    return (up * 255).round().to(torch.uint8).cpu().numpy()


def predict_images(
    model,
    items: Sequence[Item],
    out_dir: str | os.PathLike,
    cfg: PredictConfig | None = None,
    world: WorldInfo | None = None,
) -> dict:
    """Write ``<out_dir>/<name>.png`` for this rank's share of ``items``.

    ``model`` is anything with ``predict(rgb (B,3,S,S) in [0,1]) -> (B,1,S,S)`` probabilities
    (``JSMModel``). Returns {"assigned", "written", "failed": [(path, reason)], "rank", "world_size"}.
    """
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    cfg = cfg or PredictConfig()
    world = world or world_info()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mine = list(items)[world.rank :: world.world_size]
    size = cfg.size if cfg.size is not None else model_input_size(model)
    device = pick_device(cfg.device, world)
    if hasattr(model, "to"):
        model = model.to(device)
    if hasattr(model, "eval"):
        model.eval()
    loader = DataLoader(
        _Images(mine, size),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    written, failed = 0, []
    bar = tqdm(
        total=len(mine), unit="img", disable=not (cfg.progress and world.is_main), desc="predict"
    )
    with torch.inference_mode():
        for batch in loader:
            for i, err in batch["errors"]:
                log.warning("cannot read %s: %s", mine[i].path, err)
                failed.append((mine[i].path, err))
            if batch[schema.RGB] is not None:
                prob = model.predict(batch[schema.RGB].to(device, non_blocking=True))
                for j, (i, hw) in enumerate(zip(batch["i"], batch["hw"])):
                    arr = to_png_map(prob[j : j + 1], hw, cfg.minmax)
                    Image.fromarray(arr).save(out / f"{mine[i].name}.png")
                    written += 1
            bar.update(len(batch["i"]) + len(batch["errors"]))
    bar.close()
    failures = out / f"failed_rank{world.rank}.txt"
    if failed:
        failures.write_text("".join(f"{p}\t{e}\n" for p, e in failed))
    elif failures.exists():  # a list from an earlier run into this folder would mislead
        failures.unlink()
    return {
        "assigned": len(mine),
        "written": written,
        "failed": failed,
        "rank": world.rank,
        "world_size": world.world_size,
    }


def load_model_file(path: str | os.PathLike):
    """The model saved by ``jsm_dist.models.save_model`` (config + vocab + weights)."""

    return load_model(path)


def model_input_size(model, source: str = "the model") -> int:
    """The input side a model was trained at: recorded in its model file (``train_size``,
    see ``jsm_dist.models.save_model``) or its config; else 352, with a warning (files
    saved before the training size was kept)."""
    sizes = [getattr(model, "train_size", None)]
    cfg = getattr(model, "cfg", None)
    sizes += [getattr(cfg, attr, None) for attr in ("train_size", "image_size", "input_size")]
    for value in sizes:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    log.warning(
        "%s records no training size: predicting at %d px, the reference JSM test size "
        "(pass --size to choose; a model predicts best at the size it was trained at)",
        source,
        DEFAULT_SIZE,
    )
    return DEFAULT_SIZE


# ---------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="jsm-predict", description="RGB-only saliency maps from a JSM model."
    )
    ap.add_argument(
        "--model", required=True, help="model file written by jsm_dist.models.save_model"
    )
    ap.add_argument(
        "--input",
        required=True,
        help="image folder (or benchmark folder with RGB/), list file, or packed corpus folder",
    )
    ap.add_argument("--out", required=True, help="output folder for <name>.png saliency maps")
    ap.add_argument(
        "--size",
        type=int,
        default=None,
        help="network input side; default: the training size recorded in the model file, "
        f"else {DEFAULT_SIZE}",
    )
    ap.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader decode workers (0 = none)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument(
        "--minmax", action="store_true", help="stretch each map to 0..255 (reference demo_test)"
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--log-level", default="INFO", help="logging level")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    world = world_info()
    try:
        items = list_inputs(args.input)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"jsm-predict: {exc}") from None
    model = load_model_file(args.model)
    cfg = PredictConfig(
        size=args.size if args.size is not None else model_input_size(model, args.model),
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=args.device,
        minmax=args.minmax,
        progress=not args.no_progress,
    )
    summary = predict_images(model, items, args.out, cfg, world)
    msg = (
        f"rank {summary['rank']}/{summary['world_size']}: wrote {summary['written']} of "
        f"{summary['assigned']} maps to {args.out} at input size {cfg.size}"
    )
    if summary["failed"]:
        msg += f"; {len(summary['failed'])} unreadable (listed in failed_rank{summary['rank']}.txt)"
    print(msg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
