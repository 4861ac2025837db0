"""Text fitting (jsm_dist/refine/textfit.py): a fitted COPY of the text network scores the update."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_tiny_corpus

from benchmarks.model import VOCAB, make_batch
from jsm_dist import jsm, schema
from jsm_dist.data.stream import DataConfig
from jsm_dist.models import JSMModel, ModelConfig
from jsm_dist.refine.textfit import (
    batch_loss_share,
    capped_shards,
    collect_pooled,
    fit_pooled,
    fit_scorer,
    global_positions,
    state_digest,
)

SIZE = 32


def tiny_model() -> JSMModel:
    torch.manual_seed(0)
    cfg = ModelConfig(encoder="tiny", pretrained=False, text_hidden=32, text_layers=1, crf=False)
    return JSMModel(cfg, list(VOCAB))


def visual_batch(n: int, size: int = 64) -> dict:
    """Only the image tells the word: one caption for all, a class colour in a centre square."""
    batch = make_batch(n, size, seed=2)
    g = torch.Generator().manual_seed(4)
    words = torch.tensor([1 + i % 3 for i in range(n)])
    colours = torch.eye(3)[words - 1][:, :, None, None]
    square = torch.zeros(n, 1, size, size)
    square[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
    batch[schema.RGB] = 0.2 * torch.rand(n, 3, size, size, generator=g) + 0.8 * square * colours
    batch[schema.LABEL] = square
    batch[schema.WORD] = words
    batch[schema.WORD_POS] = torch.full((n,), 4)
    batch[schema.CAPTION] = [f"a photo of a {VOCAB[int(w)]}" for w in words]
    return batch


def test_fit_pooled_lowers_the_loss_and_leaves_the_original_alone():
    model = tiny_model()
    batch = visual_batch(6)
    pooled = model.text_pooled(batch[schema.RGB])
    before = {k: v.clone() for k, v in model.text.state_dict().items()}
    fitted, stats = fit_pooled(
        model.text,
        pooled,
        list(batch[schema.CAPTION]),
        batch[schema.WORD_POS],
        batch[schema.WORD],
        epochs=30,
        lr=3e-3,
        batch_size=3,
    )
    assert stats.samples == 6 and stats.epochs == 30
    assert stats.loss_last < 0.8 * stats.loss_first
    assert not fitted.training
    after = model.text.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the original is untouched
    assert any(not torch.equal(before[k], v) for k, v in fitted.state_dict().items())


class MassScorer(torch.nn.Module):
    """A known scorer: the more of the image a map covers, the surer the word and the less
    "negative" (logits from the map's mean; the real network tokenises the captions)."""

    def __init__(self, real):
        super().__init__()
        self.real = real

    def encode_text(self, *args):
        return self.real.encode_text(*args)

    def forward(self, feat, maps, text):
        mass = maps.float().mean(dim=(-3, -2, -1))  # (K, B)
        logits = torch.zeros(*mass.shape, len(VOCAB))
        logits[..., 1:] = 8.0 * mass[..., None]
        logits[..., 0] = -4.0 * mass
        return logits


def stub_batch(n: int = 4) -> dict:
    batch = visual_batch(n)
    g = torch.Generator().manual_seed(9)  # current labels of different sizes
    batch[schema.LABEL] = (
        torch.rand(n, 1, 64, 64, generator=g) < torch.rand(n, 1, 1, 1, generator=g)
    ).float()
    return batch


def test_refine_scores_with_the_given_text_network():
    model = tiny_model()
    batch = stub_batch()
    own = model.refine(batch)
    same = model.refine(batch, text=model.text)
    torch.testing.assert_close(own["conf"], same["conf"])
    scorer = MassScorer(model.text).train()
    got = model.refine(batch, text=scorer)
    assert scorer.training  # its mode is restored; it scored in eval mode
    assert (got["conf"][:, 0] - own["conf"][:, 0]).abs().min() > 1e-2  # the scorer decides
    torch.testing.assert_close(got["candidate"], own["candidate"])  # the images do not


@pytest.mark.parametrize("score", ["word", "word_vs_negative"])
def test_refine_weights_follow_the_configured_candidate_score(score):
    model = tiny_model()
    model.cfg.jsm_score = score
    batch = stub_batch()
    out = model.refine(batch, text=MassScorer(model.text))
    p = []
    for m in (batch[schema.LABEL], out["candidate"]):  # by hand, one map at a time
        logp = torch.log_softmax(MassScorer(model.text)(None, m[None], None)[0], -1)
        s = logp[torch.arange(len(logp)), batch[schema.WORD]]
        p.append(s - logp[:, 0] if score == "word_vs_negative" else s)
    want = torch.softmax(torch.stack(p, 1), dim=1)
    torch.testing.assert_close(out["conf"], want, atol=1e-6, rtol=1e-6)
    assert (want[:, 1] - 0.5).abs().max() > 1e-2  # the candidates score differently


def test_fit_scorer_single_process_uses_every_sample_and_is_deterministic(tmp_path):
    corpus = make_tiny_corpus(tmp_path, shard_sizes=(3, 2, 4), size=SIZE)
    model = tiny_model()
    cfg = DataConfig(train_size=SIZE, batch_size=2, num_workers=0)
    cache = collect_pooled(model, corpus, cfg, torch.device("cpu"))
    assert cache["pooled"].shape == (9, 2, model.text.v_conv.in_channels)
    assert sorted(zip(cache["shard"], cache["index"])) == [
        (s, i) for s, n in enumerate((3, 2, 4)) for i in range(n)
    ]
    capped = collect_pooled(model, corpus, cfg, torch.device("cpu"), max_samples=4)
    assert len(capped["caption"]) == 5  # whole shards: 3 + 2 reach the cap of 4
    assert capped_shards(corpus, 2, 1, 0) == [1]  # rank 1 of 2 owns the odd shards
    assert capped_shards(corpus, 1, 0, 3) == [0]
    kw = {"device": torch.device("cpu"), "epochs": 3, "lr": 1e-3, "seed": 5}
    a, stats = fit_scorer(model, corpus, cfg, **kw)
    b, _ = fit_scorer(model, corpus, cfg, **kw)
    assert stats.samples == 9
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def fit_inputs(n: int = 10):
    model = tiny_model()
    batch = visual_batch(n)
    with torch.no_grad():
        pooled = model.text_pooled(batch[schema.RGB])
    words = batch[schema.WORD].clone()
    words[::4] = 0  # some samples without a salient word
    return model, pooled, list(batch[schema.CAPTION]), batch[schema.WORD_POS], words


def plain_fit(text, pooled, captions, word_pos, words, *, epochs, lr, batch_size, seed, clip):
    """The fit transcribed plainly: one process, Adam over every weight (the whole token
    embedding included), value clipping, :func:`jsm.tsm_loss` per batch."""
    fitted = copy.deepcopy(text)
    tokens = fitted.encode_text(captions, word_pos, words)
    params = [p for p in fitted.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr, fused=True)
    gen = torch.Generator().manual_seed(seed)
    fitted.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(epochs):
            for idx in torch.randperm(len(words), generator=gen).split(batch_size):
                logp = torch.log_softmax(
                    fitted.forward_pooled(pooled[:, idx], tokens.select(idx)), -1
                )
                loss = jsm.tsm_loss(logp, words[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_value_(params, clip)
                opt.step()
    return fitted.eval()


def test_fit_pooled_is_the_plain_fit():
    """Dropout on: the single-process stream is rank 0's. Only the caption tokens' embedding
    rows are fitted; the others (zero gradient and moments under Adam) stay where they are."""
    model, pooled, captions, word_pos, words = fit_inputs()
    kw = {"epochs": 3, "lr": 3e-3, "batch_size": 4, "seed": 11, "clip": 0.05}
    want = plain_fit(model.text, pooled, captions, word_pos, words, **kw)
    got, stats = fit_pooled(model.text, pooled, captions, word_pos, words, **kw)
    assert stats.samples == 10 and stats.loss_last < stats.loss_first
    steps = kw["epochs"] * -(-len(words) // kw["batch_size"])
    for k, v in want.state_dict().items():
        # softmax ignores a key bias: its true gradient is 0, and Adam turns the float noise
        # of two summation orders (the fit computes only the rows that exist) into steps of
        # up to lr; every other weight must agree
        atol = kw["lr"] * steps if k.endswith("attention.self.key.bias") else 1e-6
        torch.testing.assert_close(got.state_dict()[k], v, atol=atol, rtol=0, msg=k)
    emb = got.bert.get_input_embeddings()
    assert isinstance(emb, torch.nn.Embedding) and emb.num_embeddings == len(model.text.tokenizer)
    moved = (emb.weight != model.text.bert.get_input_embeddings().weight).any(1)
    used = torch.zeros_like(moved)
    used[model.text.encode_text(captions, word_pos, words).input_ids.unique()] = True
    assert moved.any() and not (moved & ~used).any()


def test_batches_follow_the_global_places_not_the_local_order():
    model, pooled, captions, word_pos, words = fit_inputs()
    kw = {"epochs": 2, "lr": 3e-3, "batch_size": 3, "seed": 2, "clip": 0.5}
    want, _ = fit_pooled(model.text, pooled, captions, word_pos, words, **kw)
    shuffled = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    got, stats = fit_pooled(
        model.text,
        pooled[:, shuffled],
        [captions[i] for i in shuffled],
        word_pos[shuffled],
        words[shuffled],
        positions=shuffled,  # sample i of this call sits at place shuffled[i]
        total=10,
        **kw,
    )
    assert stats.samples == 10
    for k, v in want.state_dict().items():
        torch.testing.assert_close(got.state_dict()[k], v, atol=1e-6, rtol=0, msg=k)
    with pytest.raises(ValueError, match="outside the corpus' shard sizes"):
        fit_pooled(model.text, pooled, captions, word_pos, words, positions=torch.arange(10),
                   total=9, **kw)  # fmt: skip


def test_loss_shares_of_a_split_batch_sum_to_its_tsm_loss():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(2, 7, 5, generator=g), -1)
    words = torch.tensor([1, 0, 3, 2, 0, 4, 1])
    whole = jsm.tsm_loss(logp, words)
    n_word = int((words != 0).sum())
    torch.testing.assert_close(batch_loss_share(logp, words, 7, n_word), whole)
    parts = [batch_loss_share(logp[:, s], words[s], 7, n_word) for s in (slice(0, 2), slice(2, 7))]
    torch.testing.assert_close(sum(parts), whole)
    no_word = torch.zeros(3, dtype=torch.long)
    torch.testing.assert_close(
        batch_loss_share(logp[:, :3], no_word, 3, 0), jsm.tsm_loss(logp[:, :3], no_word)
    )


def test_global_places_from_the_shard_sizes(tmp_path):
    corpus = make_tiny_corpus(tmp_path, shard_sizes=(3, 2, 4), size=SIZE)
    shard, index = [2, 0, 1, 2], [3, 0, 1, 0]
    pos, total = global_positions(corpus, 2, 0, shard, index)
    assert total == 9 and pos.tolist() == [8, 0, 4, 5]  # (shard, index) order over all shards
    # cap 2 per rank: rank 0 caches shard 0, rank 1 shard 1; shard 2 is not in the order
    pos, total = global_positions(corpus, 2, 2, shard, index)
    assert total == 5 and pos.tolist() == [-1, 0, 4, -1]
    pos, _ = global_positions(corpus, 1, 0, [0, 7, -1, 1], [3, 0, 0, 1])
    assert pos.tolist() == [-1, -1, -1, 4]  # past a shard's end, unknown shards


def test_state_digest_sees_one_changed_weight():
    model = tiny_model()
    twin = copy.deepcopy(model.text)
    assert state_digest(twin) == state_digest(model.text)
    with torch.no_grad():
        twin.head[1].bias[0] += 1e-7
    assert state_digest(twin) != state_digest(model.text)


def test_other_object_negatives_add_one_negative_term_each():
    """batch_loss_share with region rows: a direct transcription, sample by sample; rows
    marked invalid (images with fewer regions) contribute nothing; shares still sum."""
    g = torch.Generator().manual_seed(3)
    logp = torch.log_softmax(torch.randn(5, 7, 9, generator=g), -1)  # 2 + 3 region rows
    words = torch.tensor([1, 2, 0, 4, 5, 6, 7])
    valid = torch.rand(3, 7, generator=g) > 0.4
    n, n_word = 7, 6
    pos = -sum(float(logp[0, b, words[b]]) for b in range(n) if words[b] != 0) / n_word
    neg = (
        -sum(
            float(logp[1, b, 0]) + sum(float(logp[2 + r, b, 0]) for r in range(3) if valid[r, b])
            for b in range(n)
        )
        / n
    )
    whole = batch_loss_share(logp, words, n, n_word, valid)
    assert float(whole) == pytest.approx((pos + neg) / 2, rel=1e-5)
    parts = [
        batch_loss_share(logp[:, s], words[s], n, n_word, valid[:, s])
        for s in (slice(0, 3), slice(3, 7))
    ]
    torch.testing.assert_close(sum(parts), whole)
    # no region rows: the reference pair
    torch.testing.assert_close(
        batch_loss_share(logp[:2], words, n, n_word), jsm.tsm_loss(logp[:2], words)
    )


def test_fit_with_other_objects_is_the_plain_fit_over_every_row():
    """Rows of absent regions (all-zero pooled features) are skipped by the fit; without
    dropout it must land on the weights of a plain fit that computes every row and masks
    the absent ones in the loss."""
    model, pooled, captions, word_pos, words = fit_inputs()
    for m in model.text.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    g = torch.Generator().manual_seed(5)
    regions = torch.randn(3, *pooled.shape[1:], generator=g)
    regions[torch.rand(3, pooled.shape[1], generator=g) > 0.5] = 0.0  # absent regions
    pooled = torch.cat([pooled, regions])
    kw = {"epochs": 2, "lr": 3e-3, "batch_size": 4, "seed": 2, "clip": 0.05}
    got, _ = fit_pooled(model.text, pooled, captions, word_pos, words, **kw)
    want = copy.deepcopy(model.text)
    tokens = want.encode_text(captions, word_pos, words)
    params = [p for p in want.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, kw["lr"], fused=True)
    gen = torch.Generator().manual_seed(kw["seed"])
    want.train()
    for _ in range(kw["epochs"]):
        for idx in torch.randperm(len(words), generator=gen).split(kw["batch_size"]):
            logp = torch.log_softmax(want.forward_pooled(pooled[:, idx], tokens.select(idx)), -1)
            valid = pooled[2:, idx].abs().amax(-1) > 0
            w = words[idx]
            pos = -(logp[0].gather(1, w[:, None])[:, 0] * (w != 0)).sum() / max(
                int((w != 0).sum()), 1
            )
            neg = -(logp[1, :, 0].sum() + (logp[2:, :, 0] * valid).sum()) / len(idx)
            opt.zero_grad(set_to_none=True)
            ((pos + neg) / 2).backward()
            torch.nn.utils.clip_grad_value_(params, kw["clip"])
            opt.step()
    steps = kw["epochs"] * -(-len(words) // kw["batch_size"])
    for k, v in want.state_dict().items():
        atol = kw["lr"] * steps if k.endswith("attention.self.key.bias") else 1e-5
        torch.testing.assert_close(got.state_dict()[k], v, atol=atol, rtol=0, msg=k)
