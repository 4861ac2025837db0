"""CPD-style saliency network (Wu et al., "Cascaded Partial Decoder", CVPR 2019), as in JSM.

Structure (reference ``CPD_ResNet``): shared stem to stride 8 -> attention branch (deep stages,
RFB blocks, partial-decoder aggregation -> attention logits at stride 8) -> holistic attention
re-weights the stride-8 features -> detection branch (a second copy of the deep stages, RFB,
aggregation -> detection logits and the 3*channel (=96) feature map). Both logits and the
feature map are upsampled bilinearly to the input size.

Differences from the reference, on purpose: upsampling uses target sizes instead of fixed
scale factors (any input size works, not only multiples of 32); everything else (the RFB
branches, the multiplicative aggregation, ``BasicConv2d`` = conv + BN *without* ReLU as in the
reference) follows the code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from jsm_dist.models.encoders import build_encoder, clone_deep
from jsm_dist.models.ssm import HolisticAttention


class BasicConv2d(nn.Sequential):
    """Conv + BN (the reference defines a ReLU but never applies it)."""

    def __init__(self, cin: int, cout: int, k, stride: int = 1, padding=0, dilation: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout),
        )


class RFB(nn.Module):
    """RFB-like multi-scale block: four branches with growing receptive fields + residual."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()

        def branch(k: int) -> nn.Sequential:
            p = k // 2
            return nn.Sequential(
                BasicConv2d(cin, cout, 1),
                BasicConv2d(cout, cout, (1, k), padding=(0, p)),
                BasicConv2d(cout, cout, (k, 1), padding=(p, 0)),
                BasicConv2d(cout, cout, 3, padding=k, dilation=k),
            )

        self.branch0 = BasicConv2d(cin, cout, 1)
        self.branch1, self.branch2, self.branch3 = branch(3), branch(5), branch(7)
        self.conv_cat = BasicConv2d(4 * cout, cout, 3, padding=1)
        self.conv_res = BasicConv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cat = torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], 1)
        return F.relu(self.conv_cat(cat) + self.conv_res(x))


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=True)


class Aggregation(nn.Module):
    """CPD partial decoder: dense multiplicative aggregation of strides 32/16/8."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv_upsample1 = BasicConv2d(c, c, 3, padding=1)
        self.conv_upsample2 = BasicConv2d(c, c, 3, padding=1)
        self.conv_upsample3 = BasicConv2d(c, c, 3, padding=1)
        self.conv_upsample4 = BasicConv2d(c, c, 3, padding=1)
        self.conv_upsample5 = BasicConv2d(2 * c, 2 * c, 3, padding=1)
        self.conv_concat2 = BasicConv2d(2 * c, 2 * c, 3, padding=1)
        self.conv_concat3 = BasicConv2d(3 * c, 3 * c, 3, padding=1)
        self.conv4 = BasicConv2d(3 * c, 3 * c, 3, padding=1)
        self.conv5 = nn.Conv2d(3 * c, 1, 1)

    def forward(self, x32: torch.Tensor, x16: torch.Tensor, x8: torch.Tensor):
        """Returns (logit at stride 8, 3c-channel feature at stride 8)."""
        x16_1 = self.conv_upsample1(_up(x32, x16)) * x16
        x8_1 = self.conv_upsample2(_up(x32, x8)) * self.conv_upsample3(_up(x16, x8)) * x8
        x16_2 = self.conv_concat2(torch.cat([x16_1, self.conv_upsample4(_up(x32, x16))], 1))
        x8_2 = self.conv_concat3(torch.cat([x8_1, self.conv_upsample5(_up(x16_2, x8))], 1))
        fea = self.conv4(x8_2)
        return self.conv5(fea), fea


class CPDNet(nn.Module):
    """Encoder + two CPD branches + holistic attention.

    ``forward(x)`` takes the *normalised* image (B, 3, H, W) and returns
    ``(att_logit, det_logit, feat)``: logits (B, 1, H, W) and features (B, 3*channel, H, W).
    """

    def __init__(
        self,
        encoder: str = "efficientnet_lite0",
        encoder_weights: str | None = None,
        pretrained: bool = True,
        channel: int = 32,
        gauss_size: int = 31,
        gauss_nsig: float = 4.0,
        gauss_mode: str = "free",
    ) -> None:
        super().__init__()
        parts = build_encoder(encoder, encoder_weights, pretrained)
        c8, c16, c32 = parts.channels
        self.stem = parts.stem
        self.deep16_1, self.deep32_1 = parts.deep16, parts.deep32
        self.deep16_2, self.deep32_2 = clone_deep(parts)
        self.rfb8_1, self.rfb16_1, self.rfb32_1 = (
            RFB(c8, channel),
            RFB(c16, channel),
            RFB(c32, channel),
        )
        self.rfb8_2, self.rfb16_2, self.rfb32_2 = (
            RFB(c8, channel),
            RFB(c16, channel),
            RFB(c32, channel),
        )
        self.agg1, self.agg2 = Aggregation(channel), Aggregation(channel)
        self.ha = HolisticAttention(gauss_size, gauss_nsig, gauss_mode)
        self.feat_channels = 3 * channel
        self.encoder_channels = parts.channels

    def init_output_bias(self, prior: float) -> None:
        """Start both branches' logits at ``logit(prior)`` (output-layer bias; the weights
        keep their init). A saliency map is mostly background: from PyTorch's default
        bias (about 0) the network first spends its steps pushing every pixel down, and a
        short run ends with a grey background (docs/experiments.md, "Final model")."""
        if not 0.0 < prior < 1.0:
            raise ValueError(f"prior must be in (0, 1), got {prior}")
        for agg in (self.agg1, self.agg2):
            nn.init.constant_(agg.conv5.bias, math.log(prior / (1.0 - prior)))

    def feature_channels(self, kind: str) -> int:
        """Channels of :meth:`forward`'s third output for ``feat=kind``."""
        return {"decoder": self.feat_channels, "encoder": self.encoder_channels[1]}[kind]

    def forward(self, x: torch.Tensor, feat: str | None = "decoder"):
        """``feat``: ``"decoder"`` = the 3c-channel decoder map at input size (reference),
        ``"encoder"`` = the stride-16 encoder features (attention branch, native size),
        ``None`` = skip it."""
        x8 = self.stem(x)
        a16 = self.deep16_1(x8)
        a32 = self.deep32_1(a16)
        att, _ = self.agg1(self.rfb32_1(a32), self.rfb16_1(a16), self.rfb8_1(x8))

        h8 = self.ha(torch.sigmoid(att), x8)
        d16 = self.deep16_2(h8)
        d32 = self.deep32_2(d16)
        det, fea = self.agg2(self.rfb32_2(d32), self.rfb16_2(d16), self.rfb8_2(h8))

        size = x.shape[-2:]

        def up(t: torch.Tensor) -> torch.Tensor:
            return F.interpolate(t, size=size, mode="bilinear", align_corners=True)

        if feat == "decoder":
            out = up(fea)
        elif feat == "encoder":
            out = a16
        elif feat is None:
            out = None
        else:
            raise ValueError(f"feat must be 'decoder', 'encoder' or None, got {feat!r}")
        return up(att), up(det), out
