"""``jsm-labels`` / ``python -m jsm_dist.labels``: inspect, check, export, compare, roll back.

Exit codes: 0 success; 1 damage found (fsck) or the command failed; 2 bad usage.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

from jsm_dist.labels.manifest import LabelStoreError
from jsm_dist.labels.store import LabelStore
from jsm_dist.labels.tools import diff, export, fsck, store_dir

log = logging.getLogger("jsm_dist.labels")


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "store",
        type=Path,
        help="label-store directory, or a packed corpus or training run directory (its "
        "labels/ store is used)",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="jsm-labels",
        description="Inspect and maintain a jsm_dist pseudo-label store (generations of "
        "memory-mappable label shards; see the jsm_dist.labels module docstring).",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ap.add_argument(
        "--progress",
        choices=("auto", "on", "off"),
        default="auto",
        help="progress bars on stderr: auto = only on a terminal (default auto)",
    )
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="generations, sizes, current generation")
    _store_arg(p)
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")

    p = sub.add_parser("fsck", help="verify checksums, shapes, completeness (exit 1 on damage)")
    _store_arg(p)
    p.add_argument(
        "--all",
        action="store_true",
        help="check every retained generation, not only the current one",
    )

    p = sub.add_parser("export", help="write one generation as PNGs named by sample key")
    _store_arg(p)
    p.add_argument("--gen", type=int, default=None, help="generation to export (default: current)")
    p.add_argument("--out", type=Path, required=True, help="output directory (created)")
    p.add_argument("--limit", type=int, default=None, help="export at most this many samples")

    p = sub.add_parser("diff", help="per-sample change between two generations, and quality vs GT")
    _store_arg(p)
    p.add_argument("--a", type=int, required=True, help="older generation")
    p.add_argument("--b", type=int, required=True, help="newer generation")
    p.add_argument(
        "--gt-dir",
        type=Path,
        default=None,
        help="ground truth as <key>.png files (default: gt.png members of the corpus the "
        "store belongs to, when corpus.json says has_gt)",
    )
    p.add_argument("--no-gt", action="store_true", help="skip the comparison with ground truth")
    p.add_argument(
        "--csv", type=Path, default=None, help="write one row per sample to this CSV file"
    )

    p = sub.add_parser(
        "rollback", help="make an older retained generation current (deletes newer ones)"
    )
    _store_arg(p)
    p.add_argument("--to", type=int, required=True, help="generation to make current")

    p = sub.add_parser("pin", help="protect a generation from retention (or --remove the pin)")
    _store_arg(p)
    p.add_argument("--gen", type=int, required=True, help="generation to pin")
    p.add_argument("--remove", action="store_true", help="unpin instead")
    return ap


def _open(path: Path):

    return LabelStore.open(store_dir(path))


def _info(store, as_json: bool) -> int:
    m = store.manifest
    info = {
        "root": str(store.root),
        "current": store.generation,
        "generations": store.generations,
        "pinned": store.pinned,
        "keep": store.keep,
        "label_size": list(store.label_size),
        "shards": store.num_shards,
        "samples": store.num_samples,
        "side_columns": store.side_columns,
        "bytes_per_generation": store.num_samples
        * (store.frame_bytes + 4 * len(store.side_columns)),
        "committed": {e["generation"]: e.get("committed_at") for e in m["generations"]},
        "carried_over": {e["generation"]: e.get("carried_over", 0) for e in m["generations"]},
        "keys": (store.root / "keys.json").is_file(),
        "corpus": m.get("corpus"),  # a training run's store: the corpus it was seeded from
        "run_dir": m.get("run_dir"),
    }
    if as_json:
        print(json.dumps(info, indent=1))
        return 0
    sizes = store.shard_sizes
    print(f"label store  {info['root']}")
    print(f"current      {info['current']}")
    print(f"generations  {info['generations']}  (keep {info['keep']}, pinned {info['pinned']})")
    print(
        f"samples      {info['samples']} in {info['shards']} shards (min {min(sizes)}, max {max(sizes)})"
    )
    print(
        f"label size   {info['label_size'][0]}x{info['label_size'][1]} uint8; side {info['side_columns']}"
    )
    print(f"per gen      {info['bytes_per_generation'] / 2**20:.1f} MiB")
    print(f"sample keys  {'keys.json' if info['keys'] else 'none recorded'}")
    if info["corpus"]:
        link = info["corpus"]
        print(
            f"corpus       {link.get('root')} (seeded from its generation "
            f"{link.get('generation')}; run {info['run_dir']})"
        )
    for g, t in info["committed"].items():
        carried = info["carried_over"][g]
        print(f"  gen {g:>4}  committed {t}" + (f"  ({carried} carried over)" if carried else ""))
    return 0


def _diff(store, args, progress) -> int:

    rows, s = diff(
        store, args.a, args.b, gt_dir=args.gt_dir, use_gt=not args.no_gt, progress=progress
    )
    if args.csv is not None:
        cols = ["shard", "index", "key", "mean_abs", "flip", "fg_a", "fg_b"] + [
            c for c in ("mae_a", "mae_b", "sm_a", "sm_b") if any(c in r for r in rows)
        ]
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    print(f"diff gen {s['a']} -> gen {s['b']}: {s['samples']} samples")
    if s["samples"]:
        print(f"  mean |change|          {s['mean_abs']:.4f}")
        print(f"  pixels flipped (@128)  {s['flip']:.4f}  ({s['changed_samples']} samples > 1%)")
        print(f"  foreground fraction    {s['fg_a']:.4f} -> {s['fg_b']:.4f}")
        if s["samples_with_gt"]:
            print(
                f"  vs GT ({s['samples_with_gt']} samples)   MAE {s['mae_a']:.4f} -> {s['mae_b']:.4f}"
                f"   S-measure {s['sm_a']:.4f} -> {s['sm_b']:.4f}"
            )
            if s["samples_without_gt"]:
                print(f"  without GT             {s['samples_without_gt']} samples (not scored)")
        else:
            print("  vs GT                  no ground truth available")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    progress = {"auto": None, "on": True, "off": False}[args.progress]

    try:
        store = _open(args.store)
        if args.cmd == "info":
            return _info(store, args.json)
        if args.cmd == "fsck":
            rep = fsck(store, all_generations=args.all, progress=progress)
            for n in rep.notes:
                print(f"note: {n}")
            for p in rep.problems:
                print(f"DAMAGE: {p}")
            print(
                f"fsck {store.root}: generations checked {rep.checked}: "
                f"{'clean' if rep.ok else f'{len(rep.problems)} problem(s)'}"
            )
            return 0 if rep.ok else 1
        if args.cmd == "export":
            gen = store.generation if args.gen is None else args.gen
            n = export(store, gen, args.out, progress=progress, limit=args.limit)
            print(f"exported {n} labels of generation {gen} to {args.out}")
            return 0
        if args.cmd == "diff":
            return _diff(store, args, progress)
        if args.cmd == "rollback":
            old = store.generation
            store.rollback(args.to)
            print(f"rolled back {store.root} from generation {old} to {args.to}")
            return 0
        if args.cmd == "pin":
            (store.unpin if args.remove else store.pin)(args.gen)
            print(f"pinned generations: {store.pinned}")
            return 0
    except (LabelStoreError, FileNotFoundError, FileExistsError, ValueError, OSError) as e:
        log.error("%s", e)
        return 1
    return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
