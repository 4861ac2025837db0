"""JSMModel: saliency, depth, SSM and text networks in ONE nn.Module.

One module and one optimizer (with a parameter group per sub-network) replace the reference's
four models and four Adam optimizers. The losses are summed into ``loss``; since every
sub-network's loss only reaches that sub-network's parameters (the saliency prediction and
the visual feature are detached where the reference detaches them), ``backward`` of the sum
gives each parameter exactly the gradient the reference's separate ``backward`` calls give,
and per-parameter Adam plus per-element value clipping then make identical updates
(``tests/unit/test_models.py`` checks this).

Settings (``ModelConfig.mode``):

- ``weak``: labels = the batch's pseudo-labels; the text network is trained (positive/negative
  NLL pair) and weighs the two candidates at update time.
- ``unsupervised``: no tags/captions; no text network. The update mixes the current label and
  the BNS candidate with fixed weights ``(1 - unsup_weight_d, unsup_weight_d)`` (default equal).
- ``full``: labels = ground truth; SSM/depth network trained as an auxiliary task; no text
  network; ``refine`` returns the batch label unchanged (no update).

Choices against the reference (each a config switch): the text network reads the saliency
encoder's stride-16 features by default (``text_feature``; measurement in models/text.py);
the SSM kernel learns through a straight-through estimator (``ssm_straight_through``; in the
reference the hard threshold leaves the "learnable" kernel without gradient); the CRF runs
in a process pool on float maps, no PNG round trip. ``refine``/``predict`` switch to eval
mode themselves and restore the previous mode.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from jsm_dist import crf, jsm, schema
from jsm_dist.fileperm import file_mode
from jsm_dist.models.config import ModelConfig
from jsm_dist.models.saliency import CPDNet
from jsm_dist.models.ssm import SSM
from jsm_dist.models.text import TSM
from jsm_dist.refine import regions

log = logging.getLogger(__name__)

# CPDNet parameters that start from the pretrained encoder and are fine-tuned at ``lr``
ENCODER_PARTS = ("stem.", "deep16_1.", "deep32_1.")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class JSMModel(nn.Module):
    """The whole JSM training pipeline. ``vocab[0]`` must be ``"<negative>"``."""

    def __init__(self, cfg: ModelConfig, vocab: list[str], *, load_pretrained: bool = True):
        super().__init__()
        if not vocab or vocab[0] != schema.NEGATIVE_WORD:
            raise ValueError(f"vocab[0] must be {schema.NEGATIVE_WORD!r}, got {vocab[:1]!r}")
        self.cfg, self.vocab = cfg, list(vocab)
        # square input side (pixels) the model was trained at, recorded in the model file
        # so that prediction runs at the same scale; None until known
        self.train_size: int | None = None

        def cpd() -> CPDNet:
            return CPDNet(
                cfg.encoder,
                cfg.encoder_weights,
                cfg.pretrained and load_pretrained,
                cfg.decoder_channels,
                cfg.gauss_size,
                cfg.gauss_nsig,
                cfg.gauss_mode,
            )

        self.saliency = cpd()
        if cfg.saliency_prior > 0:
            self.saliency.init_output_bias(cfg.saliency_prior)
        self.depth = cpd()
        self.ssm = SSM(
            cfg.gauss_size,
            cfg.gauss_nsig,
            cfg.gauss_mode,
            cfg.ssm_threshold,
            cfg.ssm_straight_through,
        )
        self.text: TSM | None = None
        if cfg.mode == "weak":
            self.text = TSM(
                self.vocab,
                self.saliency.feature_channels(cfg.text_feature),
                cfg.text_model,
                cfg.tokenizer,
                cfg.text_hidden,
                cfg.text_layers,
                cfg.text_heads,
                cfg.visual_dim,
                cfg.text_dropout,
                cfg.max_text_len,
                load_pretrained=load_pretrained,
            )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    # ---- inputs ----------------------------------------------------------------------------
    def _norm_rgb(self, rgb: torch.Tensor) -> torch.Tensor:
        return (rgb - self.mean) / self.std

    def _depth_in(self, rgb_n: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        if self.cfg.depth_input == "rgb":
            return rgb_n  # the reference feeds the depth network the RGB image
        # depth replicated to 3 channels, normalised with the ImageNet grey statistics
        return (depth.expand(-1, 3, -1, -1) - 0.449) / 0.226

    def _text_batch(self, batch: dict, device, text: TSM | None = None):
        return (self.text if text is None else text).encode_text(
            list(batch[schema.CAPTION]), batch[schema.WORD_POS], batch[schema.WORD], device
        )

    # ---- training --------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Losses for one (augmented) batch: ``loss`` = ``loss_sal + loss_dep + loss_txt``."""
        rgb = batch[schema.RGB]
        depth = batch[schema.DEPTH].to(rgb.dtype)
        target = batch[schema.GT if self.cfg.mode == "full" else schema.LABEL].to(rgb.dtype)
        x = self._norm_rgb(rgb)
        need_feat = self.text is not None
        att, det, feat = self.saliency(x, feat=self.cfg.text_feature if need_feat else None)

        if self.cfg.sample_weighting:
            w = jsm.sample_loss_weights(det, target)  # sums to 1 over the batch

            def bce(logit):
                per = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
                return (per.flatten(1).mean(1) * w).sum()
        else:

            def bce(logit):
                return F.binary_cross_entropy_with_logits(logit, target)

        loss_sal = (bce(att) + bce(det)) / 2.0

        s_prob = torch.sigmoid(det.detach())
        d_mask = self.ssm(s_prob, depth)  # Eq. 1 (kernel learns through the STE, if enabled)
        att_d, det_d, _ = self.depth(self._depth_in(x, depth), feat=None)
        loss_dep = (F.mse_loss(att_d, d_mask) + F.mse_loss(det_d, d_mask)) / 2.0

        if self.text is not None:
            text = self._text_batch(batch, rgb.device)
            maps = torch.stack([s_prob, 1.0 - s_prob])  # salient region, background
            logp = F.log_softmax(self.text(feat.detach(), maps, text), dim=-1)
            loss_txt = jsm.tsm_loss(logp, batch[schema.WORD].to(rgb.device).long())
        else:
            loss_txt = loss_sal.new_zeros(())
        return {
            "loss": loss_sal + loss_dep + loss_txt,
            "loss_sal": loss_sal,
            "loss_dep": loss_dep,
            "loss_txt": loss_txt,
        }

    # ---- label update ----------------------------------------------------------------------
    @torch.no_grad()
    def refine(
        self, batch: dict, text: TSM | None = None, timings: dict | None = None
    ) -> schema.RefineOutput:
        """New labels for an un-augmented batch (runs in eval mode, restores the mode after).

        Returns ``label`` (B, 1, H, W) in [0, 1], ``candidate`` = BNS ``L_d`` (B, 1, H, W),
        ``conf`` (B, 2) float32 = (w_g, w_d). ``text``: a text network to score the
        candidates with instead of ``self.text`` (the fitted copy of ``jsm_dist.refine.textfit``).
        ``timings``: a dict whose ``"crf"`` entry gains the seconds spent in the CRF.
        """
        was_training = self.training
        scorer = text if text is not None else self.text
        scorer_training = scorer is not None and scorer.training
        self.eval()
        if scorer is not None:
            scorer.eval()  # a scorer from outside the module too: no dropout in the update
        try:
            return self._refine(batch, scorer, timings)
        finally:
            self.train(was_training)
            if scorer is not None:
                scorer.train(scorer_training)

    @torch.no_grad()
    def text_pooled(self, rgb: torch.Tensor, batch: dict | None = None, negatives: int = 0):
        """The text network's training inputs, pooled: ``masked_pool(feat, [S, 1 - S])``
        (2, B, C) from the saliency network in eval mode (restores the mode after).

        ``negatives`` > 0 (needs ``batch`` with depth and label): ``negatives`` more rows,
        (2 + negatives, B, C), pooled over other objects of the image: candidate regions
        (refine/regions.py, from the current label, S and the depth layers) that overlap
        neither ``S > 0.5`` nor the label by more than 10% of their area; all-zero rows
        where an image has fewer."""
        if self.text is None:
            raise RuntimeError(f"mode {self.cfg.mode!r} has no text network")
        was_training = self.training
        self.eval()
        try:
            _, det, feat = self.saliency(self._norm_rgb(rgb), feat=self.cfg.text_feature)
            s = torch.sigmoid(det)
            maps = [s, 1.0 - s]
            if negatives > 0:
                maps += list(self._negative_regions(batch, s, negatives))
            return self.text.masked_pool(feat, torch.stack(maps))
        finally:
            self.train(was_training)

    def _negative_regions(self, batch: dict, s_prob: torch.Tensor, n: int) -> torch.Tensor:
        """(n, B, 1, H, W) masks of up to ``n`` regions per image away from the salient one."""
        label = batch[schema.LABEL].to(s_prob.dtype)
        depth = batch[schema.DEPTH].to(s_prob.dtype)
        params = self.cfg.region_params()
        regs = regions.extract_regions(label, s_prob, torch.zeros_like(s_prob), depth, params)
        salient = ((s_prob > 0.5) | (label > 0.5)).to(s_prob.dtype)
        area = regs.masks.sum((-3, -2, -1))
        overlap = (regs.masks * salient[None]).sum((-3, -2, -1))
        away = regs.valid & (overlap <= 0.1 * area)
        # the first n regions away from the salient one, in extraction order
        rank = torch.cumsum(away.long(), 0) - 1
        out = torch.zeros(n, *s_prob.shape, dtype=s_prob.dtype, device=s_prob.device)
        k_idx, b_idx = torch.nonzero(away & (rank < n), as_tuple=True)
        out[rank[k_idx, b_idx], b_idx] = regs.masks[k_idx, b_idx]
        return out

    def _refine(self, batch: dict, text: TSM | None, timings=None) -> dict[str, torch.Tensor]:
        rgb = batch[schema.RGB]
        l_g = batch[schema.LABEL].to(rgb.dtype)
        b = rgb.shape[0]
        x = self._norm_rgb(rgb)
        _, det, feat = self.saliency(x, feat=self.cfg.text_feature if text is not None else None)
        _, det_d, _ = self.depth(self._depth_in(x, batch[schema.DEPTH].to(rgb.dtype)), feat=None)
        l_d = jsm.bns_candidate(det, det_d)
        if self.cfg.mode == "full":
            conf = torch.tensor([[1.0, 0.0]], device=rgb.device).expand(b, 2)
            return {
                schema.LABEL: l_g.clamp(0, 1),
                "candidate": l_d,
                "conf": conf.float().contiguous(),
            }
        extra = {}
        if self.cfg.label_update == "regions":
            l_g, l_d, extra = self._repair_regions(batch, l_g, l_d, torch.sigmoid(det), feat, text)
        if text is not None:
            logits = text(feat, torch.stack([l_g, l_d]), self._text_batch(batch, rgb.device, text))
            word = batch[schema.WORD].to(rgb.device).long()
            p = jsm.candidate_score(logits, word, self.cfg.jsm_score)  # (2, B)
            conf = jsm.jsm_weights(p[0], p[1])
            # no salient word -> no text evidence: the text-free fixed weights
            fixed = torch.tensor(
                [1.0 - self.cfg.unsup_weight_d, self.cfg.unsup_weight_d], device=rgb.device
            )
            conf = torch.where((word == schema.NEGATIVE_CLASS)[:, None], fixed.to(conf.dtype), conf)
        else:
            wd = self.cfg.unsup_weight_d
            conf = torch.tensor([[1.0 - wd, wd]], device=rgb.device).expand(b, 2)
        label = jsm.jsm_update(l_g, l_d, conf)
        label = jsm.postprocess(label, self.cfg.post_sigmoid, self.cfg.post_minmax)
        if self.cfg.crf:
            params = crf.CRFParams(size=self.cfg.crf_size, iters=self.cfg.crf_iters)
            t0 = time.perf_counter()
            label = crf.dense_crf(label, rgb, params, workers=self.cfg.crf_workers)
            if timings is not None:
                timings["crf"] = timings.get("crf", 0.0) + time.perf_counter() - t0
        label = label.clamp(0, 1)
        out = {schema.LABEL: label, "candidate": l_d, "conf": conf.float().contiguous(), **extra}
        if text is not None:
            # GT-free quality signal: how surely the text network names the salient word
            # from the region the NEW label selects (used to choose a generation to stop at)
            logits = text(feat, label[None], self._text_batch(batch, rgb.device, text))
            word = batch[schema.WORD].to(rgb.device).long()
            out["text_conf"] = jsm.word_log_prob(logits, word)[0].exp().float()
        return out

    def _repair_regions(self, batch, l_g, l_d, s_prob, feat, text):
        """Region repair before the blend (refine/regions.py): the candidates restricted to
        the chosen object. Returns ``(L_g', L_d', extra outputs)``."""
        params = self.cfg.region_params()
        depth = batch[schema.DEPTH].to(l_g.dtype)
        regs = regions.extract_regions(l_g, s_prob, l_d, depth, params)
        scores = regions.confidence_scores(regs, s_prob)
        if text is not None and self.cfg.region_score == "text":
            word = batch[schema.WORD].to(l_g.device).long()
            tb = self._text_batch(batch, l_g.device, text)
            logits = text(feat, regs.masks, tb, rows=regs.valid)  # absent regions: not computed
            by_text = jsm.candidate_score(logits, word, "word_vs_negative")
            # no salient word: no text evidence, the text-free score decides
            scores = torch.where((word == schema.NEGATIVE_CLASS)[None], scores, by_text)
        keep, repaired = regions.select_regions(scores, regs, params.keep_margin, params.min_score)
        g, d, _ = regions.repair_candidates(l_g, l_d, regs, keep, repaired, params.grow)
        best_src = regs.source.gather(
            0, scores.masked_fill(~regs.valid, float("-inf")).argmax(0)[None]
        )[0]
        added = repaired & (best_src != regions.SOURCE_LABEL)
        return g, d, {"region_repaired": repaired, "region_added": added}

    @torch.no_grad()
    def text_log_probs(self, batch: dict, maps: torch.Tensor) -> torch.Tensor:
        """Diagnostics: log-probabilities (K, B, n_classes) of the text network for K maps
        (K, B, 1, H, W) over the saliency features of ``batch`` (eval mode)."""
        if self.text is None:
            raise RuntimeError(f"mode {self.cfg.mode!r} has no text network")
        was_training = self.training
        self.eval()
        try:
            rgb = batch[schema.RGB]
            _, _, feat = self.saliency(self._norm_rgb(rgb), feat=self.cfg.text_feature)
            logits = self.text(feat, maps.to(rgb.dtype), self._text_batch(batch, rgb.device))
            return F.log_softmax(logits, dim=-1)
        finally:
            self.train(was_training)

    # ---- test time -------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, rgb: torch.Tensor) -> torch.Tensor:
        """Saliency probabilities (B, 1, H, W) from RGB in [0, 1]: the saliency network only,
        detection branch, in eval mode (restores the mode after)."""
        was_training = self.training
        self.eval()
        try:
            _, det, _ = self.saliency(self._norm_rgb(rgb), feat=None)
            return torch.sigmoid(det)
        finally:
            self.train(was_training)

    # ---- optimisation ----------------------------------------------------------------------
    def sub_networks(self) -> dict[str, nn.Module]:
        nets = {"saliency": self.saliency, schema.DEPTH: self.depth, "ssm": self.ssm}
        if self.text is not None:
            nets["text"] = self.text
        return nets

    def param_groups(
        self, lr: float, decoder_lr: float | None = None, **overrides: float
    ) -> list[dict]:
        """One optimizer param group per sub-network (``name`` key), all at ``lr``
        unless ``overrides`` gives a sub-network its own (e.g. ``text=5e-5``). Frozen
        parameters are left out, and so is a sub-network with none left (the reference SSM).

        ``decoder_lr``: the saliency and depth networks' layers outside their shared stem
        and attention-branch stages (RFB blocks, both aggregations, the detection branch's
        stages) get their own group ``<net>_decoder`` at this rate (None = ``lr``): a
        decoder trained from scratch at the encoder's fine-tuning rate underfits a short
        run (docs/experiments.md, "Final model")."""
        unknown = set(overrides) - set(self.sub_networks())
        if unknown:
            raise ValueError(f"param_groups: unknown sub-networks {sorted(unknown)}")
        groups = []
        for name, net in self.sub_networks().items():
            named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
            own = overrides.get(name, lr)
            split = decoder_lr is not None and isinstance(net, CPDNet)
            parts = {name: [p for n, p in named if not split or n.startswith(ENCODER_PARTS)]}
            if split:
                parts[f"{name}_decoder"] = [p for n, p in named if not n.startswith(ENCODER_PARTS)]
            for group, params in parts.items():
                if params:
                    rate = decoder_lr if group.endswith("_decoder") else own
                    groups.append({"params": params, "lr": rate, "name": group})
        return groups

    def clip_gradients(self, clip: float | None) -> None:
        """Clamp every gradient to [-clip, clip] by value (reference ``clip_gradient``, the
        run's ``train.clip_value``); no-op when ``clip`` is None."""
        clip_grad_value(self.parameters(), clip)


def clip_grad_value(params, clip: float | None) -> None:
    """Reference gradient clipping by value; ``None`` = off."""
    if clip is not None:
        torch.nn.utils.clip_grad_value_(list(params), clip)


def save_model(path: str | os.PathLike, model: JSMModel, train_size: int | None = None) -> None:
    """Write ``{"config", "vocab", "state_dict", "train_size"}`` atomically (temp file +
    os.replace).

    ``train_size``: the square input side the model was trained at (``data.train_size``),
    the size ``jsm-predict`` uses by default (a saliency network trained at 128 px scores
    worse on the same images fed at 352); defaults to ``model.train_size`` (None: not
    recorded).
    """
    model = getattr(model, "module", model)  # unwrap DDP
    if train_size is None:
        train_size = getattr(model, "train_size", None)
    valid = isinstance(train_size, int) and not isinstance(train_size, bool) and train_size > 0
    if train_size is not None and not valid:
        raise ValueError(f"save_model: train_size must be a positive int, got {train_size!r}")
    path = os.fspath(path)
    payload = {
        "config": model.cfg.to_dict(),
        "vocab": model.vocab,
        "state_dict": model.state_dict(),
        "train_size": train_size,
    }
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    os.fchmod(fd, file_mode())  # mkstemp makes it 0600: readable by its owner only
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> JSMModel:
    """Rebuild a :class:`JSMModel` from :func:`save_model`'s file (no pretrained downloads)."""
    payload = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    cfg = ModelConfig.from_dict(payload["config"])
    model = JSMModel(cfg, payload["vocab"], load_pretrained=False)
    model.load_state_dict(payload["state_dict"])
    model.train_size = payload.get("train_size")  # absent from files saved before it was kept
    return model
