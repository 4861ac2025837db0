"""Raw-corpus sources for the packer: scan a source into records, load records into samples.

A *record* is a small picklable dict (paths + caption fields, or a synthetic index) made by
the parent process; a *raw sample* is what a pool worker loads from it::

    {schema.KEY: str, schema.RGB: uint8 (H,W,3), "rgb_jpeg": bytes | None (original JPEG file),
     schema.DEPTH: raw depth array, schema.GT: uint8 (H,W) | None, "meta": SampleMeta}

Problems found while scanning (an RGB without depth, a CSV row without an image, ...) give
records with a ``bad`` reason; problems found while loading are yielded as BadInput.

Folder layouts (folder names are matched case-insensitively)::

    CapS-style:  RGB/<name>.jpg  depth/<name>.{png,bmp,jpg,tif,npy}  [GT/<name>.png]  CapS.csv
                 CapS.csv columns: Index, Image, Caption, Semantic, Position, SubCategory,
                 Category, Source (utf-8 or GBK; Image = RGB file name, Semantic = the
                 salient word, Position = its index in the caption)
    benchmark:   RGB/<name>.*  depth/<name>.*  GT/<name>.*   (no captions: word class 0)
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

from jsm_dist import schema
from jsm_dist.data import decode, synth
from jsm_dist.data.decode import BadInput
from jsm_dist.data.vocab import build_vocab

RGB_DIRS = ("RGB", "rgb", "Image", "image", "images", "Images")
DEPTH_DIRS = ("depth", "Depth", "DEPTH")
GT_DIRS = ("GT", "gt", "mask", "Mask", "masks")
CSV_NAMES = ("CapS.csv", "caps.csv")
CSV_ENCODINGS = ("utf-8-sig", "gbk")
REQUIRED_COLUMNS = ("Image", "Caption", "Semantic")


def _find_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    for n in names:
        if (root / n).is_dir():
            return root / n
    lower = {n.lower() for n in names}
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if p.is_dir() and p.name.lower() in lower:
            return p
    return None


def _index_by_stem(folder: Path | None, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """stem -> file; when several files share a stem, the earlier suffix in ``suffixes`` wins."""
    out: dict[str, Path] = {}
    if folder is None:
        return out
    rank = {s: i for i, s in enumerate(suffixes)}
    for p in sorted(folder.iterdir()):
        suf = p.suffix.lower()
        if p.is_file() and suf in rank:
            old = out.get(p.stem)
            if old is None or rank[suf] < rank[old.suffix.lower()]:
                out[p.stem] = p
    return out


def read_caps_csv(path: Path) -> list[dict]:
    """Rows of CapS.csv as dicts; tries utf-8 then GBK (the reference file is GBK)."""
    data = path.read_bytes()
    text = None
    for enc in CSV_ENCODINGS:
        try:
            text = data.decode(enc)
            break
        except UnicodeDecodeError:
            continue
    if text is None:
        raise ValueError(f"{path}: neither utf-8 nor GBK text")
    rows = list(csv.DictReader(io.StringIO(text)))
    columns = {c.strip() for c in (rows[0].keys() if rows else [])}
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; has {sorted(columns)}")
    return [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in rows]


def _position(text: str) -> int | None:
    try:
        return int(float(text))
    except (TypeError, ValueError):
        return None


def _folder_records(cfg, with_text: bool) -> tuple[list[dict], list[str]]:

    root = Path(cfg.input)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist")
    rgb_dir, depth_dir = _find_dir(root, RGB_DIRS), _find_dir(root, DEPTH_DIRS)
    gt_dir = _find_dir(root, GT_DIRS)
    if rgb_dir is None or depth_dir is None:
        raise FileNotFoundError(f"{root}: expected RGB/ and depth/ folders")
    if not with_text and gt_dir is None:
        raise FileNotFoundError(f"{root}: a benchmark folder needs GT/")
    rgbs = _index_by_stem(rgb_dir, decode.IMAGE_SUFFIXES)
    depths = _index_by_stem(depth_dir, decode.DEPTH_SUFFIXES)
    gts = _index_by_stem(gt_dir, decode.IMAGE_SUFFIXES)
    rows: dict[str, dict] = {}
    records: list[dict] = []
    words: list[str] = []
    if with_text:
        csv_path = next((root / n for n in CSV_NAMES if (root / n).is_file()), None)
        if csv_path is None:
            raise FileNotFoundError(f"{root}: no CapS.csv")
        for r in read_caps_csv(csv_path):
            stem = Path(r["Image"]).stem
            if stem in rows:
                records.append(
                    {"source": f"CapS.csv:{r['Image']}", "bad": "duplicate CapS.csv row"}
                )
                continue
            rows[stem] = r
            words.append(r["Semantic"])
            if stem not in rgbs:
                records.append({"source": f"CapS.csv:{r['Image']}", "bad": "missing rgb file"})
    seen_keys: dict[str, str] = {}
    for stem, rgb_path in rgbs.items():
        rel = str(rgb_path.relative_to(root))
        key = schema.sample_key(stem)
        if key in seen_keys:  # only a 48-bit hash collision can get here
            records.append(
                {"source": rel, "bad": f"key {key!r} already used by {seen_keys[key]!r}"}
            )
            continue
        seen_keys[key] = stem
        if stem not in depths:
            records.append({"source": rel, "bad": "missing depth file"})
            continue
        if not with_text and stem not in gts:
            records.append({"source": rel, "bad": "missing gt file"})
            continue
        meta = {"name": stem, "source": root.name, "tags": []}
        if with_text:
            row = rows.get(stem)
            if row is None:
                records.append({"source": rel, "bad": "no CapS.csv row"})
                continue
            meta.update(
                caption=row["Caption"],
                word=row["Semantic"],
                word_pos=_position(row.get("Position", "")),
                category=row.get("Category", ""),
                subcategory=row.get("SubCategory", ""),
                source=row.get("Source", "") or root.name,
            )
        gt = gts.get(stem)
        records.append(
            {
                "kind": "folder",
                "source": rel,
                schema.KEY: key,
                schema.RGB: str(rgb_path),
                schema.DEPTH: str(depths[stem]),
                schema.GT: str(gt) if gt else None,
                "meta": meta,
            }
        )
    return records, words


def scan(cfg) -> tuple[list[dict], list[str], bool]:
    """-> (records, vocabulary, has_text) for ``cfg.source``."""
    if cfg.source == "synth":
        records = [
            {"kind": "synth", "i": i, "source": f"synth:{i}"} for i in range(cfg.num_samples)
        ]
        return records, build_vocab(synth.VOCAB), True
    if cfg.source == "caps":
        records, words = _folder_records(cfg, with_text=True)
        return records, build_vocab(words), True
    records, _ = _folder_records(cfg, with_text=False)
    return records, build_vocab([]), False


def auto_label_size(cfg, records: list[dict], cap: int = 256) -> int:
    """min(cap, image side): the synthetic/resized size, else the first readable RGB's."""
    side = cfg.resize or (cfg.image_size if cfg.source == "synth" else 0)
    if not side:
        for r in records:
            if r.get("kind") == "folder":
                try:
                    from PIL import Image

                    with Image.open(r[schema.RGB]) as im:
                        side = max(im.size)
                    break
                except (OSError, ValueError):  # unreadable: the worker will report it
                    continue
    return int(min(cap, side)) if side else cap


def _synth_runs(records: list[dict]) -> Iterator[tuple[int, int, list[dict]]]:
    """Group synthetic records into runs of consecutive indices: (start, stop, records)."""
    run: list[dict] = []
    for r in records:
        if run and r["i"] != run[-1]["i"] + 1:
            yield run[0]["i"], run[-1]["i"] + 1, run
            run = []
        run.append(r)
    if run:
        yield run[0]["i"], run[-1]["i"] + 1, run


def load_records(cfg, records: list[dict]) -> Iterator[tuple[dict, dict | BadInput]]:
    """Yield (record, raw sample or BadInput) for every record, in order."""
    synth_recs = [r for r in records if r.get("kind") == "synth"]
    if synth_recs:
        scfg = synth.SynthConfig(
            num_samples=cfg.num_samples, image_size=cfg.image_size, seed=cfg.seed
        )
        for start, stop, run in _synth_runs(synth_recs):
            for rec, s in zip(run, synth.generate(scfg, start, stop), strict=True):
                meta = dict(s["meta"])
                yield (
                    rec,
                    {
                        schema.KEY: schema.sample_key(s[schema.KEY]),
                        schema.RGB: s[schema.RGB],
                        "rgb_jpeg": None,
                        schema.DEPTH: s[schema.DEPTH],
                        schema.GT: s.get(schema.GT),
                        "meta": meta,
                    },
                )
    for rec in records:
        if rec.get("kind") != "folder":
            continue
        try:
            rgb, jpeg = decode.load_rgb_file(rec[schema.RGB])
            depth = decode.load_depth_file(rec[schema.DEPTH])
            gt = decode.load_gray_file(rec[schema.GT]) if rec[schema.GT] else None
            yield (
                rec,
                {
                    schema.KEY: rec[schema.KEY],
                    schema.RGB: rgb,
                    "rgb_jpeg": jpeg,
                    schema.DEPTH: depth,
                    schema.GT: gt,
                    "meta": dict(rec["meta"]),
                },
            )
        except BadInput as exc:
            yield rec, exc
        except (OSError, ValueError) as exc:  # anything else unreadable
            yield rec, BadInput(f"unreadable: {type(exc).__name__}: {exc}")
