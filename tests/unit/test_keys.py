"""Sample keys: unique, stable and WebDataset-safe for any file name; names kept in the json."""

from __future__ import annotations

import json
import tarfile

import numpy as np
from helpers import ODD_NAMES, write_benchmark_folder
from webdataset.tariterators import base_plus_ext

from jsm_dist.data import pack
from jsm_dist.data.corpus import Corpus
from jsm_dist.schema import KEY_HASH, KEY_PREFIX, PLAIN_KEY, sample_key


def test_plain_names_are_their_own_key():
    for name in ("0086", "RGBD_data_1", "t1993_left", "synth_s0_0000001", "img-01", "A_b-C"):
        assert sample_key(name) == name


def test_every_name_gets_a_distinct_webdataset_safe_key():
    rng = np.random.default_rng(0)
    alphabet = [*"ab_-. 1~", "雨", "伞", "é"]
    names = set(ODD_NAMES)
    while len(names) < 3000:
        names.add("".join(rng.choice(alphabet, size=int(rng.integers(1, 9)))))
    keys = {sample_key(n): n for n in names}
    assert len(keys) == len(names)  # no two names share a key
    for key, name in keys.items():
        assert base_plus_ext(f"{key}.rgb.jpg") == (key, "rgb.jpg"), name  # WebDataset's split
        assert key.isascii() and "/" not in key and "." not in key and not key.startswith("-")
        assert len(key) <= max(100, KEY_PREFIX + 2 + KEY_HASH)
        plain = PLAIN_KEY.fullmatch(name) is not None and len(name) <= 100
        assert (key == name) == plain and ("--" in key) != plain


def test_lossy_sanitising_no_longer_merges_names():
    assert sample_key("a b") != sample_key("a_b") == "a_b"
    assert len({sample_key(n) for n in ("雨伞", "猫", "狗")}) == 3
    assert sample_key("雨伞").startswith("name--")
    assert sample_key("a.b").startswith("a_b--") and sample_key("a.b") != sample_key("a_b")
    assert sample_key("x" * 180) != sample_key("x" * 181)


def _keys_and_names(corpus: Corpus) -> list[tuple[str, str]]:
    out = []
    for path in corpus.shard_paths:
        with tarfile.open(path) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                if ext == "json":
                    out.append((key, json.loads(tar.extractfile(m).read())["name"]))
    return out


def test_odd_file_names_are_all_packed_with_unique_stable_keys(tmp_path):
    src = write_benchmark_folder(tmp_path / "bench")
    runs = []
    for run in ("a", "b"):
        args = ["benchmark", "--input", str(src), "--out", str(tmp_path / run), "--no-progress"]
        assert pack.main([*args, "--samples-per-shard", "5", "--workers", "1"]) == 0
        corpus = Corpus.load(tmp_path / run)
        assert corpus.bad_samples == [] and corpus.num_samples == len(ODD_NAMES)
        runs.append(_keys_and_names(corpus))
    assert runs[0] == runs[1]  # stable: the same keys, in the same order, across packs
    keys = [k for k, _ in runs[0]]
    assert len(set(keys)) == len(keys)
    assert sorted(n for _, n in runs[0]) == sorted(ODD_NAMES)  # originals kept in the json
    assert all(k == sample_key(n) for k, n in runs[0])
