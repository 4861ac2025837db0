"""Text fitting (jsm_dist/textfit.py): a fitted COPY of the text network scores the update."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_corpus

from jsm_dist import schema
from jsm_dist.bench.model import VOCAB, make_batch
from jsm_dist.data.stream import DataConfig
from jsm_dist.models import JSMModel, ModelConfig
from jsm_dist.textfit import capped_shards, collect_pooled, fit_pooled, fit_scorer

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
