"""Label store, single process: round trips, commit rules, retention, rollback, fsck, CLI, RSS."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jsm_dist.dist import WorldInfo
from jsm_dist.labels import (
    GenerationGoneError,
    IncompleteGenerationError,
    LabelStore,
    LabelStoreError,
)
from jsm_dist.labels.cli import main as cli

SIZES = [5, 3, 0, 7]
HW = (8, 6)


def run_cli(*args: str) -> int:
    return cli(["--progress", "off", *map(str, args)])


def commit_constant(store: LabelStore, g: int, value: int | None = None) -> None:
    v = g if value is None else value
    with store.writer(g) as w:
        for s, n in enumerate(store.shard_sizes):
            w.write(s, range(n), np.full((n, *store.label_size), v, np.uint8))
    store.commit(g)


def random_labels(rng, sizes=SIZES, hw=HW) -> list[np.ndarray]:
    return [rng.integers(0, 256, (n, *hw), dtype=np.uint8) for n in sizes]


@pytest.fixture
def store(tmp_path: Path) -> LabelStore:
    return LabelStore.create(tmp_path / "labels", SIZES, HW, keep=3)


def test_round_trip_random_access(store: LabelStore) -> None:
    rng = np.random.default_rng(1)
    data = random_labels(rng)
    conf = [rng.random((n, 2), dtype=np.float32) for n in SIZES]
    with store.writer(0) as w:
        for s, n in enumerate(SIZES):
            order = rng.permutation(n)
            for part in np.array_split(order, 2):  # out of order, several calls per shard
                w.write(s, part, data[s][part], conf[s][part])
    assert store.generation == -1  # nothing visible before the commit
    store.commit(0)
    assert store.generation == 0
    for s, n in enumerate(SIZES):
        for i in rng.permutation(n):
            np.testing.assert_array_equal(store.read(s, int(i)), data[s][i])
        side = store.read_side(s)
        np.testing.assert_array_equal(side[:, :2], conf[s])
        np.testing.assert_array_equal(side[:, 2], np.zeros(n, np.float32))
        if n:
            np.testing.assert_array_equal(store.memmap(s), data[s])
    pick = [(s, i) for s, n in enumerate(SIZES) for i in range(n)]
    rng.shuffle(pick)
    got = store.read_many([p[0] for p in pick], [p[1] for p in pick])
    np.testing.assert_array_equal(got, np.stack([data[s][i] for s, i in pick]))
    reopened = LabelStore.open(store.root)
    np.testing.assert_array_equal(reopened.read(3, 6), data[3][6])
    with pytest.raises(IndexError):
        store.read(1, 3)


def test_float_labels_are_rounded_resized_and_range_checked(store: LabelStore) -> None:
    x = np.random.default_rng(2).random((5, 1, *HW), dtype=np.float32)
    w = store.writer(0)
    w.write(0, range(5), x)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        w.write(1, [0], np.full((1, *HW), 1.5, np.float32))
    w.write(1, range(3), np.full((3, 16, 12), 0.5, np.float32))  # other resolution: resized
    w.write(3, range(7), np.ones((7, *HW), bool))
    w.close()
    store.commit(0)
    np.testing.assert_array_equal(store.read_many([0] * 5, range(5)), np.rint(x[:, 0] * 255))
    assert store.read(1, 2).shape == HW and (store.read(1, 2) == 128).all()
    assert (store.read(3, 0) == 255).all()
    assert np.isnan(store.read_side(0)[:, :2]).all()  # no conf given: NaN, not zeros


def test_commit_refuses_incomplete_generation(store: LabelStore) -> None:
    commit_constant(store, 0)
    with store.writer(1) as w:
        for s, n in enumerate(SIZES):
            keep = [i for i in range(n) if (s, i) != (3, 4)]  # one sample never written
            w.write(s, keep, np.full((len(keep), *HW), 9, np.uint8))
    with pytest.raises(IncompleteGenerationError, match=r"shard 3: 6 of 7 samples written.*\[4\]"):
        store.commit(1)
    assert store.generation == 0 and (store.read(3, 4) == 0).all()
    with store.writer(1) as w:  # a shard never written at all
        w.write(0, range(5), np.full((5, *HW), 9, np.uint8))
    with pytest.raises(IncompleteGenerationError, match="shard 1: not written"):
        store.commit(1)
    assert LabelStore.open(store.root).generation == 0
    commit_constant(store, 1)  # a complete rerun commits
    assert store.generation == 1


def test_restarted_writer_discards_stale_partial_attempt(store: LabelStore) -> None:
    commit_constant(store, 0)
    with store.writer(1) as w:  # attempt 1 finished shard 0, then "crashed" before commit
        w.write(0, range(5), np.full((5, *HW), 77, np.uint8))
    w2 = store.writer(1)  # attempt 2 restarts generation 1 but forgets shard 0
    for s in (1, 3):
        w2.write(s, range(SIZES[s]), np.full((SIZES[s], *HW), 1, np.uint8))
    w2.close()
    with pytest.raises(IncompleteGenerationError, match="shard 0"):
        store.commit(1)


def test_writer_rules(store: LabelStore) -> None:
    with pytest.raises(LabelStoreError, match="can only write generation 0"):
        store.writer(1)
    w = store.writer(0, world=WorldInfo(rank=1, world_size=2))
    with pytest.raises(LabelStoreError, match="does not own shard 0"):
        w.write(0, [0], np.zeros((1, *HW), np.uint8))
    with pytest.raises(IndexError):
        w.write(1, [3], np.zeros((1, *HW), np.uint8))
    with pytest.raises(ValueError, match="conf"):
        w.write(1, [0], np.zeros((1, *HW), np.uint8), np.zeros((1, 3), np.float32))
    with pytest.raises(LabelStoreError, match="already open"):
        store.writer(0)
    with pytest.raises(LabelStoreError, match="close"):
        store.commit(0)
    w.abort()
    with pytest.raises(FileExistsError):
        LabelStore.create(store.root, SIZES, HW)
    with pytest.raises(ValueError, match="keep"):
        LabelStore.create(store.root / "x", SIZES, HW, keep=1)
    with pytest.raises(ValueError, match="keys"):
        LabelStore.create(store.root / "y", SIZES, HW, keys=[["a"]] * 4)


def test_retention_pin_and_rollback(store: LabelStore) -> None:
    for g in range(4):
        commit_constant(store, g)
    assert store.generations == [1, 2, 3]
    assert not (store.root / "gen-000000").exists()
    store.pin(1)
    commit_constant(store, 4)
    commit_constant(store, 5)
    assert store.generations == [1, 3, 4, 5] and store.has_generation(1)
    assert (store.read(0, 0, generation=1) == 1).all()
    assert run_cli("rollback", store.root, "--to", 3) == 0
    store.refresh()
    assert store.generation == 3 and store.generations == [1, 3]
    assert not store.has_generation(4) and not (store.root / "gen-000005").exists()
    assert (store.read(3, 6) == 3).all()
    with pytest.raises(LabelStoreError, match="retained"):
        store.rollback(2)
    commit_constant(store, 4, value=40)  # the next generation after a rollback is rewritten
    assert (store.read(0, 0) == 40).all()
    store.unpin(1)
    assert store.prune(keep=2) == [1]
    assert store.generations == [3, 4]


def test_reader_pinned_until_refresh_and_gone_after_retention(store: LabelStore) -> None:
    commit_constant(store, 0)
    reader = LabelStore.open(store.root)
    assert (reader.read(0, 0) == 0).all()  # opens shard 0 of generation 0
    commit_constant(store, 1)
    assert (reader.read(0, 1) == 0).all() and (reader.read(3, 0) == 0).all()  # still pinned
    assert reader.refresh() and (reader.read(0, 1) == 1).all()
    old = LabelStore.open(store.root)
    old._m = json.loads(json.dumps(reader.manifest))  # a reader pinned to generation 1 ...
    assert (old.read(0, 0) == 1).all()  # ... that opened shard 0 only
    for g in (2, 3, 4):
        commit_constant(store, g)  # keep=3: generation 1 is deleted
    assert (old.read(0, 4) == 1).all()  # an open descriptor survives the deletion
    with pytest.raises(GenerationGoneError, match="refresh"):
        old.read(3, 0)
    old.refresh()
    assert (old.read(3, 0) == 4).all()


def test_refresh_after_rollback_and_rewrite_reads_the_new_generation(store: LabelStore) -> None:
    commit_constant(store, 0)
    commit_constant(store, 1, value=11)
    reader = LabelStore.open(store.root)
    assert (reader.read(0, 0) == 11).all()  # holds a descriptor of generation 1
    store.rollback(0)
    commit_constant(store, 1, value=22)  # generation 1 again, different content
    reader.refresh()
    assert reader.generation == 1 and (reader.read(0, 0) == 22).all()


def test_fork_and_pickle(store: LabelStore) -> None:
    rng = np.random.default_rng(3)
    data = random_labels(rng)
    with store.writer(0) as w:
        for s, n in enumerate(SIZES):
            w.write(s, range(n), data[s])
    store.commit(0)
    np.testing.assert_array_equal(store.read(3, 1), data[3][1])  # parent opened descriptors
    parent_fd = store._fds[(0, 3, ".u8")]
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must reopen its own descriptors, then read correctly
        got = store.read(3, 2)
        ok = np.array_equal(got, data[3][2]) and store._pid == os.getpid()
        ok = ok and store._fds[(0, 3, ".u8")] != parent_fd  # its own descriptor
        os.write(wfd, b"1" if ok else b"0")
        os._exit(0)
    os.close(wfd)
    assert os.read(r, 1) == b"1"
    os.waitpid(pid, 0)
    clone = pickle.loads(pickle.dumps(store))
    assert clone._fds == {}
    np.testing.assert_array_equal(clone.read(0, 4), data[0][4])


def test_fsck_catches_corruption(store: LabelStore, capsys) -> None:
    commit_constant(store, 0)
    commit_constant(store, 1)
    store.writer(2).write(0, [0], np.zeros((1, *HW), np.uint8))  # abandoned attempt: a note only
    assert run_cli("fsck", store.root, "--all") == 0
    assert "uncommitted" in capsys.readouterr().out
    path = store.shard_path(1, 3)
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert run_cli("fsck", store.root) == 1
    assert "gen 1 shard 3: shard-000003.u8 checksum mismatch" in capsys.readouterr().out
    path.write_bytes(bytes(raw[:-1]))
    assert run_cli("fsck", store.root) == 1
    assert "expected" in capsys.readouterr().out
    side = store.shard_path(0, 0, ".side")
    side.write_bytes(b"\0" * side.stat().st_size)
    assert run_cli("fsck", store.root) == 1  # current generation only: gen 0 not checked
    assert run_cli("fsck", store.root, "--all") == 1
    assert "gen 0 shard 0: shard-000000.side checksum" in capsys.readouterr().out
    assert run_cli("fsck", store.root / "nothing-here") == 1


def test_cli_info_export_and_diff_against_gt_dir(tmp_path: Path, capsys) -> None:
    sizes = [4, 3]
    keys = [[f"img{s}_{i}" for i in range(n)] for s, n in enumerate(sizes)]
    st = LabelStore.create(tmp_path / "labels", sizes, HW, keys=keys)
    rng = np.random.default_rng(4)
    gens = [random_labels(rng, sizes) for _ in range(2)]
    for g, data in enumerate(gens):
        with st.writer(g) as w:
            for s in range(2):
                w.write(s, range(sizes[s]), data[s])
        st.commit(g)
    assert run_cli("info", st.root, "--json") == 0
    assert json.loads(capsys.readouterr().out)["generations"] == [0, 1]
    out = tmp_path / "png"
    assert run_cli("export", st.root, "--gen", 0, "--out", out) == 0
    for s, ks in enumerate(keys):
        for i, k in enumerate(ks):
            np.testing.assert_array_equal(np.asarray(Image.open(out / f"{k}.png")), gens[0][s][i])
    gt = {k: (rng.random(HW) > 0.5).astype(np.uint8) * 255 for ks in keys for k in ks}
    gt_dir = tmp_path / "gt"
    gt_dir.mkdir()
    for k, m in gt.items():
        Image.fromarray(m).save(gt_dir / f"{k}.png")
    table = tmp_path / "diff.csv"
    assert run_cli("diff", st.root, "--a", 0, "--b", 1, "--gt-dir", gt_dir, "--csv", table) == 0
    assert "S-measure" in capsys.readouterr().out
    rows = list(csv.DictReader(table.read_text().splitlines()))
    assert len(rows) == sum(sizes)
    for row in rows:
        s, i = int(row["shard"]), int(row["index"])
        a, b = gens[0][s][i].astype(float), gens[1][s][i].astype(float)
        assert float(row["mean_abs"]) == pytest.approx(np.abs(a - b).mean() / 255)
        assert float(row["flip"]) == pytest.approx(((a >= 128) != (b >= 128)).mean())
        pa = (a - a.min()) / (a.max() - a.min())  # PySODMetrics min-max normalises the map
        assert float(row["mae_a"]) == pytest.approx(np.abs(pa - (gt[row["key"]] > 128)).mean())


def test_keys_and_gt_from_corpus_tars(tmp_path: Path, capsys) -> None:
    from jsm_dist.data.corpus import Corpus, ShardInfo

    sizes, corpus_dir = [2, 3], tmp_path / "corpus"
    corpus_dir.mkdir()
    gts = {}
    for s, n in enumerate(sizes):
        with tarfile.open(corpus_dir / f"shard-{s:06d}.tar", "w") as tar:
            for i in range(n):
                key = f"sample{s}{i}"
                gts[key] = np.zeros((32, 24), np.uint8)
                gts[key][: 4 * (i + 1)] = 255
                buf = io.BytesIO()
                Image.fromarray(gts[key]).save(buf, format="PNG")
                for ext, payload in (
                    ("json", json.dumps({"shard": s}).encode()),
                    ("gt.png", buf.getvalue()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    shards = [ShardInfo(f"shard-{s:06d}.tar", n) for s, n in enumerate(sizes)]
    Corpus(corpus_dir, "tiny", ["<negative>", "cat"], shards, HW, has_gt=True).save()
    st = LabelStore.create(corpus_dir / "labels", sizes, HW)
    commit_constant(st, 0, value=0)
    commit_constant(st, 1, value=255)
    assert run_cli("export", corpus_dir, "--out", tmp_path / "png") == 0  # corpus dir accepted
    assert sorted(p.stem for p in (tmp_path / "png").iterdir()) == sorted(gts)
    assert run_cli("diff", corpus_dir, "--a", 0, "--b", 1, "--csv", tmp_path / "d.csv") == 0
    assert "vs GT (5 samples)" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "d.csv").read_text().splitlines()))
    for row in rows:  # all-white label vs a GT with a known white fraction
        fg = (gts[row["key"]] > 0).mean()
        assert float(row["mae_b"]) == pytest.approx(1 - fg, abs=0.02)


# Peak RSS = VmHWM of the child's own address space. ru_maxrss is not used: Linux carries
# the spawning parent's high-water mark across fork+exec into the child's ru_maxrss (under
# pytest that is the test runner's ~200 MB, identical for every child).
RSS_SCRIPT = """
import sys
import numpy as np
from jsm_dist.labels import LabelStore
st = LabelStore.open(sys.argv[1])
total = 0
if sys.argv[2] == "read":
    for s, n in enumerate(st.shard_sizes):
        for lo in range(0, n, 64):
            idx = range(lo, min(n, lo + 64))
            total += int(st.read_many([s] * len(idx), idx).sum(dtype=np.int64))
else:  # control: a reader caching one mapping per shard grows RSS with every page touched
    maps = [st.memmap(s) for s in range(st.num_shards)]
    for m in maps:
        for lo in range(0, len(m), 64):
            total += int(m[lo : lo + 64].sum(dtype=np.int64))
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(hwm, total)
"""


def peak_rss_kib(root: Path, how: str) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(root), how],
        capture_output=True,
        text=True,
        check=True,
    )
    rss, total = out.stdout.split()
    return int(rss), int(total)


def make_big_store(root: Path, n: int, shard: int = 2000) -> LabelStore:
    sizes = [shard] * (n // shard)
    st = LabelStore.create(root, sizes, (64, 64))
    with st.writer(0) as w:
        block = np.full((shard, 64, 64), 1, np.uint8)
        for s in range(len(sizes)):
            w.write(s, range(shard), block)
    st.commit(0)
    return st


def test_peak_rss_flat_as_corpus_grows(tmp_path: Path) -> None:
    small = make_big_store(tmp_path / "small", 2_000)
    big = make_big_store(tmp_path / "big", 20_000)
    rss_small, sum_small = peak_rss_kib(small.root, "read")
    rss_big, sum_big = peak_rss_kib(big.root, "read")
    assert (sum_small, sum_big) == (2_000 * 4096, 20_000 * 4096)  # every label was read
    assert rss_big <= 1.10 * rss_small, (rss_small, rss_big)
    rss_mapped, _ = peak_rss_kib(big.root, "memmap")  # the measurement can see growth
    assert rss_mapped > rss_small + 40_000, (rss_small, rss_mapped)


def test_cli_help_everywhere(capsys) -> None:
    for cmd in ([], ["info"], ["fsck"], ["export"], ["diff"], ["rollback"], ["pin"]):
        with pytest.raises(SystemExit) as e:
            cli([*cmd, "--help"])
        assert e.value.code == 0
        assert "usage" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli(["diff", "somewhere"])  # --a/--b missing
    assert e.value.code == 2
