"""The text network's fast forward (batch cut to its longest caption, last BERT layer at the
mask position only) against BERT's own full forward."""

from __future__ import annotations

import pytest
import torch

from jsm_dist.models.text import TSM, TextBatch, bert_at, minilm_path

VOCAB = ["negative", "cat", "dog", "cube", "ball", "heart", "star", "cone", "ring", "box"]
MODELS = ["tiny"] + (["minilm"] if minilm_path() is not None else [])


def make_tsm(text_model: str, dropout: float = 0.1) -> TSM:
    torch.manual_seed(0)
    tiny = text_model == "tiny"
    kw = {"hidden": 32, "heads": 2, "layers": 3, "tokenizer": "builtin"} if tiny else {}
    return TSM(VOCAB, feat_channels=12, text_model=text_model, dropout=dropout,
               load_pretrained=False, **kw)  # fmt: skip


def captions_batch(tsm: TSM, pad: int = 0) -> TextBatch:
    caps = ["a cat", "a small red cube left of a big blue ball and a star", "the dog", "a ring"]
    words = [1, 3, 2, 8]
    pos = [1, 4, 1, 1]
    text = tsm.encode_text(caps, torch.tensor(pos), torch.tensor(words), torch.device("cpu"))
    if pad:  # as a batch selected from a cache padded to a longer caption
        extra = pad
        z = torch.zeros(len(caps), extra, dtype=text.input_ids.dtype)
        text = TextBatch(torch.cat([text.input_ids, z], 1), torch.cat(
            [text.attention_mask, z], 1), text.mask_index)  # fmt: skip
    return text


def slow(tsm: TSM, pooled: torch.Tensor, text: TextBatch) -> torch.Tensor:
    tsm.fast = False
    try:
        return tsm.forward_pooled(pooled, text)
    finally:
        tsm.fast = True


@pytest.mark.parametrize("text_model", MODELS)
def test_bert_at_is_bert_read_at_one_position(text_model):
    tsm = make_tsm(text_model).eval()
    n, t, w = 6, 9, tsm.bert.config.hidden_size
    embeds = torch.randn(n, t, w)
    mask = torch.ones(n, t, dtype=torch.long)
    lengths = [9, 3, 5, 9, 1, 7]
    for r, ln in enumerate(lengths):
        mask[r, ln:] = 0
    idx = torch.tensor([8, 0, 4, 2, 0, 6])
    want = tsm.bert(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    got = bert_at(tsm.bert, embeds, mask, idx)
    assert torch.allclose(got, want[torch.arange(n), idx], atol=1e-5)


@pytest.mark.parametrize("text_model", MODELS)
def test_fast_forward_equals_the_plain_one_on_padded_batches(text_model):
    tsm = make_tsm(text_model).eval()
    text = captions_batch(tsm, pad=7)
    assert text.trimmed().input_ids.shape[1] == text.input_ids.shape[1] - 7  # the cut happens
    pooled = torch.randn(3, 4, 12)
    got = tsm.forward_pooled(pooled, text)
    want = slow(tsm, pooled, text)
    assert got.shape == want.shape == (3, 4, len(VOCAB))
    assert torch.allclose(got, want, atol=1e-5)


def test_fast_forward_gives_the_plain_gradients():
    """Train mode without dropout: the same loss and the same gradient on every parameter
    (every parameter gets one: nothing left unused for DDP)."""
    tsm = make_tsm("tiny", dropout=0.0).train()
    text = captions_batch(tsm, pad=5)
    pooled = torch.randn(2, 4, 12)
    grads = []
    for fast in (True, False):
        tsm.zero_grad()
        tsm.fast = fast
        tsm.forward_pooled(pooled, text).logsumexp(-1).sum().backward()
        grads.append({k: p.grad.clone() for k, p in tsm.named_parameters() if p.grad is not None})
    tsm.fast = True
    used = {k for k, p in tsm.named_parameters() if p.requires_grad}
    used -= {k for k in used if "word_embeddings" in k}  # only the caption's rows move
    assert used <= set(grads[0]) and set(grads[0]) == set(grads[1])
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-5), k


def test_trimmed_keeps_rows_and_cuts_only_common_padding():
    ids = torch.tensor([[5, 6, 7, 0, 0, 0], [5, 6, 0, 0, 0, 0]])
    att = (ids != 0).long()
    tb = TextBatch(ids, att, torch.tensor([1, 0])).trimmed()
    assert torch.equal(tb.input_ids, ids[:, :3]) and torch.equal(tb.attention_mask, att[:, :3])
    full = TextBatch(ids[:, :3], att[:, :3], torch.tensor([0, 1]))
    assert full.trimmed() is full


def test_forward_rows_computes_the_chosen_rows_and_fills_the_rest():
    tsm = make_tsm("tiny").eval()
    text = captions_batch(tsm)
    pooled = torch.randn(5, 4, 12)
    rows = torch.rand(5, 4) > 0.5
    rows[0, 0], rows[1, 0] = True, False
    got = tsm.forward_rows(pooled, text, rows, fill=-7.0)
    want = tsm.forward_pooled(pooled, text)
    assert torch.allclose(got[rows], want[rows], atol=1e-5)
    assert (got[~rows] == -7.0).all()
    none = tsm.forward_rows(pooled, text, torch.zeros(5, 4, dtype=torch.bool))
    assert none.shape == want.shape and (none == 0).all()


def test_region_scores_skip_absent_regions_without_changing_the_labels(monkeypatch):
    """Region repair scores only the regions that exist; scoring every row (the plain way)
    gives the same labels."""
    from benchmarks.model import VOCAB as MODEL_VOCAB
    from benchmarks.model import make_batch
    from jsm_dist import schema
    from jsm_dist.models import JSMModel, ModelConfig

    cfg = ModelConfig(encoder="tiny", text_model="tiny", text_hidden=32, text_heads=2,
                      crf=False, label_update="regions", region_score="text")  # fmt: skip
    torch.manual_seed(0)
    model = JSMModel(cfg, MODEL_VOCAB, load_pretrained=False)
    batch = make_batch(4, 32, seed=1)
    got = model.refine(batch)
    monkeypatch.setattr(
        TSM, "forward_rows", lambda self, p, t, r, fill=0.0: self.forward_pooled(p, t)
    )
    want = model.refine(batch)
    assert got["region_repaired"].any()
    torch.testing.assert_close(got[schema.LABEL], want[schema.LABEL], atol=1e-5, rtol=0)
