"""Shards from a server: a real HTTP server on loopback (tests/shard_server.py) and real
``pipe:`` commands. Drops are real: the server closes the socket mid-body, a command exits
with an error status after part of its output."""

from __future__ import annotations

import json
import shutil
import stat
import time
from pathlib import Path

import pytest
import torch
from helpers import all_ids, label_value, make_tiny_corpus
from shard_server import ShardServer

from jsm_dist.config import parse_cli
from jsm_dist.data import remote, shard_open
from jsm_dist.data.corpus import Corpus
from jsm_dist.data.stream import DataConfig, make_eval_loader, make_train_loader
from jsm_dist.dist import WorldInfo

UNEVEN = [5, 1, 7, 3, 2, 4]
DROP = "shard-000002.tar"  # the 7-sample shard: its connection breaks mid-body once


def _cfg(**kw) -> DataConfig:
    base = {"train_size": 32, "batch_size": 3, "num_workers": 0, "shuffle_buffer": 8,
            "shard_retry_wait": 0.05}  # fmt: skip
    return DataConfig(**{**base, **kw})


def _ids(batches) -> list[tuple[int, int]]:
    return [(s, i) for b in batches for s, i in zip(b["shard"].tolist(), b["index"].tolist())]


def remote_view(corpus: Corpus, dest: Path, base: str) -> Corpus:
    """What a user keeps locally after uploading the shards: corpus.json + labels/ only."""
    dest.mkdir(parents=True)
    shutil.copy(corpus.root / "corpus.json", dest / "corpus.json")
    shutil.copytree(corpus.label_dir, dest / "labels")
    return Corpus.load(dest, shard_base=base)


@pytest.fixture
def corpus(tmp_path):
    return make_tiny_corpus(tmp_path, shard_sizes=UNEVEN)


def _check_eval_exactly_once(view: Corpus, cfg: DataConfig) -> int:
    """Both ranks' eval loaders: every (shard, index) once, each with its own label and key.
    Returns the retries the loaders counted."""
    seen, retries = [], 0
    for rank in range(2):
        loader = make_eval_loader(view, cfg, world=WorldInfo(rank, 2))
        batches = list(loader)
        assert len(batches) == len(loader)
        for b in batches:
            for j, (s, i) in enumerate(zip(b["shard"].tolist(), b["index"].tolist())):
                assert b["key"][j] == f"tiny_{s:03d}_{i:04d}"
                assert b["label"][j].mean().item() == pytest.approx(label_value(s, i) / 255)
        assert loader.stats["missing"] == {} and loader.stats["shard_errors"] == 0
        seen += _ids(batches)
        retries += loader.stats["retries"]
    assert len(seen) == len(set(seen)) == view.num_samples
    assert set(seen) == all_ids(view)
    return retries


# ---- (a) evaluation / refinement loader: exactly once through a dropped connection ------------
@pytest.mark.parametrize("workers, ranges", [(0, True), (2, True), (2, False)])
def test_eval_loader_exactly_once_through_a_dropped_connection(corpus, tmp_path, workers, ranges):
    with ShardServer(corpus.root, ranges=ranges, drop_once=(DROP,)) as server:
        view = remote_view(corpus, tmp_path / "view", server.url)
        assert view.shard_paths[2] == server.url + DROP
        retries = _check_eval_exactly_once(view, _cfg(num_workers=workers))
    assert server.dropped == [DROP] and retries == 1
    assert server.requests[DROP] == 2  # the broken read + the resumed one
    size = (corpus.root / DROP).stat().st_size
    if ranges:  # resumed at the byte where it broke: the shard crossed the wire once
        assert server.range_starts == [(DROP, size // 2)]
        assert server.sent[DROP] == size
    else:  # the server cannot start mid-file: the resumed read discards the first half
        assert server.sent[DROP] == size // 2 + size


# ---- (b) training loader: the same batches as from the local corpus --------------------------
def _batches(corpus: Corpus, cfg: DataConfig, epoch: int, rank: int) -> list[dict]:
    loader = make_train_loader(corpus, cfg, epoch=epoch, seed=5, world=WorldInfo(rank, 2))
    batches = list(loader)
    assert len(batches) == len(loader)
    return batches


def _assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k, v in g.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, w[k]), k
            else:
                assert v == w[k], k


def test_train_loader_same_batches_as_local_through_a_dropped_connection(corpus, tmp_path):
    cfg = _cfg(num_workers=2)
    with ShardServer(corpus.root, ranges=True, drop_once=(DROP,)) as server:
        view = remote_view(corpus, tmp_path / "view", server.url)
        for epoch in (0, 1):
            ids = []
            for rank in range(2):
                got = _batches(view, cfg, epoch, rank)
                _assert_same_batches(got, _batches(corpus, cfg, epoch, rank))
                ids += _ids(got)
            # an epoch delivers every sample once over both ranks (4 steps, the last partial)
            assert sorted(ids) == sorted(all_ids(corpus))
    assert server.dropped == [DROP]


# ---- (c) the shard cache: later epochs send no request -------------------------------------
def test_shard_cache_second_epoch_reads_nothing_from_the_server(corpus, tmp_path):
    cache = tmp_path / "cache"
    cfg = _cfg(num_workers=2, shard_cache=str(cache))
    with ShardServer(corpus.root, drop_once=(DROP,)) as server:
        view = remote_view(corpus, tmp_path / "view", server.url)
        assert _check_eval_exactly_once(view, cfg) == 1  # the drop, retried while caching
        first = server.total_requests()
        assert first == len(UNEVEN) + 1 and server.requests[DROP] == 2
        assert _check_eval_exactly_once(view, cfg) == 0
        for rank in range(2):  # training epochs read the cache too, same batches as local
            _assert_same_batches(_batches(view, cfg, 0, rank), _batches(corpus, cfg, 0, rank))
        assert server.total_requests() == first  # nothing fetched again
    cached = sorted(p.name for p in cache.iterdir())
    assert cached == sorted(f"{s.sha256[:32]}-{s.file}" for s in corpus.shards)  # no .part left
    for s in corpus.shards:
        assert (cache / f"{s.sha256[:32]}-{s.file}").read_bytes() == (
            corpus.root / s.file
        ).read_bytes()


def _serve_tampered(corpus: Corpus, served: Path, shard: int) -> None:
    """A copy of the shards where one differs from corpus.json in its last byte only (tar
    padding, after the end-of-archive block: every sample still parses)."""
    shutil.copytree(corpus.root, served)
    path = served / corpus.shards[shard].file
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_streamed_shard_that_differs_from_corpus_json_is_reported(corpus, tmp_path):
    _serve_tampered(corpus, tmp_path / "served", 3)
    with ShardServer(tmp_path / "served") as server:
        view = remote_view(corpus, tmp_path / "view", server.url)
        loader = make_eval_loader(view, _cfg(), world=WorldInfo())
        ids = _ids(list(loader))
    assert sorted(ids) == sorted(all_ids(corpus))  # its samples arrived before the end...
    assert loader.stats["reasons"] == {"unreadable shard source": 1}  # ...then the sha256 check
    assert server.requests[corpus.shards[3].file] == 1  # a content mismatch is not retried


def test_shard_cache_refetches_a_wrong_copy_and_never_keeps_a_bad_download(corpus, tmp_path):
    cache = tmp_path / "cache"
    cfg = _cfg(shard_cache=str(cache), shard_retries=1)
    served = tmp_path / "served"
    _serve_tampered(corpus, served, 3)
    info = corpus.shards[3]
    stale = shard_open.cache_path(cache, "", corpus.shards[0].file, corpus.shards[0].sha256)
    cache.mkdir()
    stale.write_bytes(b"truncated")  # a wrong-size copy in the cache: fetched again
    with ShardServer(served) as server:
        view = remote_view(corpus, tmp_path / "view", server.url)
        loader = make_eval_loader(view, cfg, world=WorldInfo())
        ids = _ids(list(loader))
    assert sorted(ids) == sorted(x for x in all_ids(corpus) if x[0] != 3)
    assert loader.stats["missing"] == {3: info.count}
    assert loader.stats["reasons"] == {"unreadable shard source": 1}
    assert server.requests[info.file] == 1  # a content mismatch is not retried
    assert stale.read_bytes() == (corpus.root / corpus.shards[0].file).read_bytes()
    names = {p.name for p in cache.iterdir()}
    assert len(names) == len(UNEVEN) - 1 and not any(n.endswith(".part") for n in names)


def test_cache_downloads_the_next_shard_while_one_is_read(corpus, tmp_path):
    policy = remote.FetchPolicy(cache_dir=str(tmp_path / "cache"))
    first, second, third = corpus.shards[:3]
    with ShardServer(corpus.root) as server:
        items = [
            {"url": server.url + s.file, "file": s.file, "bytes": s.bytes, "sha256": s.sha256}
            for s in (first, second, third)
        ]
        streams = shard_open.shard_streams(items, shard_open.ShardOpener(policy), lambda e: False)
        item = next(streams)  # the consumer reads the first shard; nobody asked for the second
        deadline = time.monotonic() + 20
        while server.requests[second.file] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.requests[second.file] == 1 and server.requests[third.file] == 0
        assert item["stream"].read() == (corpus.root / first.file).read_bytes()
        streams.close()


# ---- pipe: commands -------------------------------------------------------------------------
def test_pipe_cat_corpus_streams_like_the_local_one(corpus, tmp_path):
    view = remote_view(corpus, tmp_path / "view", f"pipe:cat {corpus.root}/{{file}}")
    assert view.shard_paths[0] == f"pipe:cat {corpus.root}/shard-000000.tar"
    assert _check_eval_exactly_once(view, _cfg(num_workers=2)) == 0
    cfg = _cfg(num_workers=2)
    _assert_same_batches(_batches(view, cfg, 1, 0), _batches(corpus, cfg, 1, 0))


def test_pipe_command_failing_mid_shard_is_retried(corpus, tmp_path):
    script = tmp_path / "flaky.sh"
    marks = tmp_path / "marks"
    marks.mkdir()
    # the first run per shard prints half of it, then fails like a dropped download
    script.write_text(
        '#!/bin/sh\nm="$2/$(basename "$1")"\n'
        'if [ ! -e "$m" ]; then touch "$m"; head -c $(( $(wc -c < "$1") / 2 )) "$1"; exit 56; fi\n'
        'exec cat "$1"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    view = remote_view(corpus, tmp_path / "view", f"pipe:{script} {corpus.root}/{{file}} {marks}")
    assert _check_eval_exactly_once(view, _cfg(num_workers=2)) == len(UNEVEN)


def test_pipe_exit_status_catches_a_short_stream_of_unknown_size(corpus, tmp_path):
    script = tmp_path / "half-then-fail.sh"
    script.write_text('head -c 1000 "$1"; [ -e "$1.ok" ] || { touch "$1.ok"; exit 3; }\n'
                      'tail -c +1001 "$1"\n')  # fmt: skip
    path = tmp_path / "shard.tar"
    shutil.copy(corpus.root / corpus.shards[0].file, path)
    retries = []
    reader = remote.ShardReader(
        f"pipe:sh {script} {path}",  # no size or sha256 known: only the status tells
        policy=remote.FetchPolicy(wait_s=0.01),
        on_retry=lambda *a: retries.append(a[3]),
    )
    assert reader.read() == path.read_bytes()
    assert len(retries) == 1 and "status 3" in retries[0]


# ---- failures that retrying cannot fix fail at once, with the source named -----------------
def test_http_404_fails_at_once_naming_the_url(corpus):
    with ShardServer(corpus.root) as server:
        url = server.url + "no-such-shard.tar"
        with pytest.raises(remote.ShardFetchError, match=f"{url}: HTTP 404"):
            remote.ShardReader(url, policy=remote.FetchPolicy(retries=5)).read()
    assert server.requests["no-such-shard.tar"] == 1


@pytest.mark.parametrize(
    "command, message",
    [
        ("no-such-command-xyz {path}", "status 127"),  # not installed: not retried
        ("head -c 1000 {path}", "giving up after 3 failed attempts at byte 1000"),  # short
    ],
)
def test_pipe_failures_are_clear(corpus, command, message):
    info = corpus.shards[0]
    source = "pipe:" + command.format(path=corpus.root / info.file)
    policy = remote.FetchPolicy(retries=2, wait_s=0.01)
    with pytest.raises(remote.ShardFetchError, match=message):
        remote.ShardReader(source, size=info.bytes, policy=policy).read()


def test_connection_that_always_drops_gives_up_and_the_loader_reports_it(corpus, tmp_path):
    with ShardServer(corpus.root, drop_always=(DROP,)) as server:
        view = remote_view(corpus, tmp_path / "view", server.url)
        loader = make_eval_loader(view, _cfg(shard_retries=2), world=WorldInfo())
        ids = _ids(list(loader))
    assert server.requests[DROP] == 3  # the first read + 2 retries, then it gives up
    assert {s for s, _ in ids} == set(range(len(UNEVEN)))  # the samples before the break
    n_drop = UNEVEN[2]
    got = sum(1 for s, _ in ids if s == 2)
    assert got < n_drop and loader.stats["missing"] == {2: n_drop - got}
    # (the sample cut in half may also count as corrupt)
    assert loader.stats["reasons"]["unreadable shard source"] == 1
    assert loader.stats["retries"] == 2


# ---- sources, corpus.json and the up-front check ---------------------------------------------
def test_resolve_source():
    root = Path("/data/c")
    assert remote.resolve_source(root, "", "a.tar") == "/data/c/a.tar"
    assert remote.resolve_source(root, "https://h/x/", "a b.tar") == "https://h/x/a%20b.tar"
    assert remote.resolve_source(root, "https://h/x", "a.tar") == "https://h/x/a.tar"
    cmd = "pipe:aws s3 cp s3://b/c/{file} -"
    assert remote.resolve_source(root, cmd, "a.tar") == "pipe:aws s3 cp s3://b/c/a.tar -"
    assert remote.resolve_source(root, "", "pipe:cat /x/a.tar") == "pipe:cat /x/a.tar"
    assert remote.resolve_source(root, "https://h/", "http://o/a.tar") == "http://o/a.tar"
    assert remote.resolve_source(root, "/mnt/s", "a.tar") == "/mnt/s/a.tar"
    with pytest.raises(ValueError, match=r"without \{file\}"):
        remote.resolve_source(root, "pipe:gsutil cat gs://b/c/", "a.tar")


def test_corpus_json_shard_base_round_trip_and_override(corpus, tmp_path, monkeypatch):
    assert "shard_base" not in json.loads((corpus.root / "corpus.json").read_text())
    corpus.shard_base = "https://host/corpus/"
    corpus.save()
    loaded = Corpus.load(corpus.root)
    assert loaded.shard_paths[0] == "https://host/corpus/shard-000000.tar"
    monkeypatch.chdir(tmp_path)
    over = Corpus.load(corpus.root, shard_base="mirror")  # a local directory, from the cwd
    assert over.shard_paths[1] == str(tmp_path / "mirror" / "shard-000001.tar")


def test_validate_probes_the_first_remote_shard(corpus, tmp_path):
    from jsm_dist.train import validate

    with ShardServer(corpus.root) as server:
        args = ["--corpus", str(corpus.root), "--data.shard_retry_wait", "0.01"]
        cfg, _ = parse_cli([*args, "--data.shard_base", server.url])
        assert validate(cfg)[0].shard_paths[0] == server.url + "shard-000000.tar"
        assert server.total_requests() == 1  # one shard probed, not all
        bad = server.url + "wrong/"
        cfg, _ = parse_cli([*args, "--data.shard_base", bad])
        with pytest.raises(ValueError, match=f"{bad}shard-000000.tar: HTTP 404"):
            validate(cfg)
        # a base that answers, but not with shards (e.g. an HTML page): no tar header
        cfg, _ = parse_cli([*args, "--data.shard_base", "pipe:echo '<html>' {file}"])
        with pytest.raises(ValueError, match="does not start with a tar header"):
            validate(cfg)
