"""TransUNet, assembled from small modules: a hybrid CNN + Transformer encoder built from timm
parts, a UNet decoder and a swappable 3x3 head.

Both presets are the same family and the same code: timm's `VisionTransformer` whose patch
embedding is a `HybridEmbed` over a GroupNorm/weight-standardised `ResNetV2`. `r50_vit_b16`
is exactly timm's `vit_base_r50_s16_224` (its state-dict keys match, so a locally saved timm
checkpoint loads); `tiny` is the same thing narrower and shallower for a CPU.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import GroupNormAct, StdConv2dSame
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_hybrid import HybridEmbed
from torch import nn

from pipeline.config.params import ModelConfig
from pipeline.config.presets import ENCODER_PRESETS, EncoderSpec


def build_vit(spec: EncoderSpec, num_classes: int = 0) -> VisionTransformer:
    """timm's hybrid ViT for a preset: ResNetV2 stages to stride 16, then transformer blocks."""
    backbone = ResNetV2(
        layers=spec.cnn_layers, channels=spec.cnn_channels, stem_chs=spec.stem_channels,
        num_classes=0, global_pool="", preact=False, stem_type="same", conv_layer=StdConv2dSame,
        norm_layer=partial(GroupNormAct, num_groups=spec.norm_groups),
    )
    return VisionTransformer(
        img_size=spec.img_size, patch_size=1, embed_dim=spec.embed_dim, depth=spec.depth,
        num_heads=spec.num_heads, mlp_ratio=spec.mlp_ratio, num_classes=num_classes, global_pool=spec.global_pool,
        fc_norm=False,  # normalise the tokens themselves: the decoder reads them, not only the pooled head
        embed_layer=partial(HybridEmbed, backbone=backbone), dynamic_img_size=True,
    )


class HybridEncoder(nn.Module):
    """Returns the CNN skips (strides 2, 4, 8) and the transformer output as a stride-16 map."""

    def __init__(self, spec: EncoderSpec):
        super().__init__()
        self.spec = spec
        self.vit = build_vit(spec)

    def cnn_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        stem = self.vit.patch_embed.backbone.stem
        s2 = stem.norm(stem.conv(x))
        s4 = self.vit.patch_embed.backbone.stages[0](stem.pool(s2))
        s8 = self.vit.patch_embed.backbone.stages[1](s4)
        s16 = self.vit.patch_embed.backbone.stages[2](s8)
        return [s2, s4, s8, s16]

    def tokens(self, s16: torch.Tensor) -> torch.Tensor:
        """Transformer output (prefix tokens included) for a stride-16 CNN map."""
        x = self.vit.patch_embed.proj(s16).permute(0, 2, 3, 1)  # NHWC, as dynamic_img_size expects
        x = self.vit.norm_pre(self.vit._pos_embed(x))
        return self.vit.norm(self.vit.blocks(x))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        s2, s4, s8, s16 = self.cnn_features(x)
        tokens = self.tokens(s16)[:, self.vit.num_prefix_tokens:]
        b, _, h, w = s16.shape
        return [s2, s4, s8, tokens.transpose(1, 2).reshape(b, -1, h, w)]

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Image-level logits through the ViT's own head (for supervised encoder pretraining)."""
        return self.vit.forward_head(self.tokens(self.cnn_features(x)[-1]))


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class DecoderBlock(nn.Module):
    """Bilinear x2 upsample, concatenate the skip at that stride (if any), two conv-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = ConvBNReLU(in_channels + skip_channels, out_channels)
        self.conv2 = ConvBNReLU(out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class UNetDecoder(nn.Module):
    """TransUNet's cascaded upsampler: a 3x3 conv on the stride-16 map, then four blocks."""

    def __init__(self, embed_dim: int, skip_channels: tuple[int, int, int], in_channels: int,
                 channels: tuple[int, ...]):
        super().__init__()
        self.conv_more = ConvBNReLU(embed_dim, in_channels)
        skips = (skip_channels[2], skip_channels[1], skip_channels[0], 0)
        widths = (in_channels, *channels)
        self.blocks = nn.ModuleList(DecoderBlock(widths[i], skips[i], widths[i + 1]) for i in range(4))
        self.out_channels = channels[-1]

    def forward(self, features: list[torch.Tensor], shift: torch.Tensor | None = None) -> torch.Tensor:
        s2, s4, s8, s16 = features
        x = self.conv_more(s16)
        if shift is not None:
            x = x + shift
        for block, skip in zip(self.blocks, (s8, s4, s2, None)):
            x = block(x, skip)
        return x


class NoiseLevelEmbedding(nn.Module):
    """log σ -> a per-channel shift of the decoder's first feature map: how a denoiser trained
    over a range of noise levels is told the level of its input."""

    def __init__(self, channels: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1, channels), nn.SiLU(), nn.Linear(channels, channels))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.mlp(sigma.log().reshape(-1, 1))[:, :, None, None]


class SegmentationNet(nn.Module):
    """Encoder -> decoder -> 3x3 head. The head predicts noise (3 channels) while denoising and
    class logits (K channels) after `replace_head`. With `sigma_conditioning` the decoder also
    takes the noise level (denoising only; fine-tuning starts from a network without it)."""

    def __init__(self, spec: EncoderSpec, decoder_in_channels: int, decoder_channels: tuple[int, ...],
                 out_channels: int, sigma_conditioning: bool = False):
        super().__init__()
        self.encoder = HybridEncoder(spec)
        self.decoder = UNetDecoder(spec.embed_dim, spec.skip_channels, decoder_in_channels,
                                   tuple(decoder_channels))
        self.head = nn.Conv2d(self.decoder.out_channels, out_channels, 3, padding=1)
        self.noise_level = NoiseLevelEmbedding(decoder_in_channels) if sigma_conditioning else None

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        shift = None if self.noise_level is None else self.noise_level(sigma)
        return self.head(self.decoder(self.encoder(x), shift))

    def without_noise_level(self) -> dict:
        """The weights a segmenter starts from: everything but the noise-level embedding."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("noise_level.")}

    def replace_head(self, out_channels: int) -> None:
        self.head = nn.Conv2d(self.decoder.out_channels, out_channels, 3, padding=1)


class ProjectedSegmenter(nn.Module):
    """A segmenter that also returns L2-normalised pixel embeddings, a 1×1-conv projection of
    its decoder features, for the student's dense contrastive loss. Export keeps `net` only."""

    def __init__(self, net: SegmentationNet, dim: int):
        super().__init__()
        self.net = net
        width = net.decoder.out_channels
        self.projection = nn.Sequential(nn.Conv2d(width, width, 1), nn.ReLU(inplace=True), nn.Conv2d(width, dim, 1))

    @property
    def encoder(self) -> HybridEncoder:
        return self.net.encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net.decoder(self.net.encoder(x))
        return self.net.head(features), F.normalize(self.projection(features), dim=1)


def build_network(model: ModelConfig, out_channels: int, sigma_conditioning: bool = False) -> SegmentationNet:
    """The TransUNet that params' `model` section describes, with an `out_channels` head."""
    return build_model(model.preset, model.decoder_in_channels, model.decoder_channels, out_channels,
                       sigma_conditioning)


def build_model(preset: str, decoder_in_channels: int, decoder_channels: list[int] | tuple[int, ...],
                out_channels: int, sigma_conditioning: bool = False) -> SegmentationNet:
    """Build a TransUNet by preset name."""
    return SegmentationNet(ENCODER_PRESETS[preset], decoder_in_channels, tuple(decoder_channels), out_channels,
                           sigma_conditioning)


class EncoderClassifier(nn.Module):
    """The encoder with the ViT's classification head, for supervised encoder pretraining."""

    def __init__(self, spec: EncoderSpec, num_classes: int):
        super().__init__()
        self.encoder = HybridEncoder(spec)
        self.encoder.vit.reset_classifier(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.classify(x)

    def encoder_state(self) -> dict:
        """The encoder's weights without the classification head, as `HybridEncoder` holds them."""
        return {k: v for k, v in self.encoder.state_dict().items() if not k.startswith("vit.head.")}


def mixed_precision(device: torch.device):
    """bf16 autocast on a GPU (convolutions and matmuls in bf16, reductions such as softmax
    and cross-entropy kept in float32 by autocast); a no-op elsewhere, so CPU runs stay
    float32 and bit-reproducible."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
