"""TransUNet, assembled from small modules: a hybrid CNN + Transformer encoder built from timm
parts, a UNet decoder and a swappable 3x3 head.

Both presets are the same family and the same code: timm's `VisionTransformer` whose patch
embedding is a `HybridEmbed` over a GroupNorm/weight-standardised `ResNetV2`. `r50_vit_b16`
is exactly timm's `vit_base_r50_s16_224` (its state-dict keys match, so a locally saved timm
checkpoint loads); `tiny` is the same thing narrower and shallower for a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import GroupNormAct, StdConv2dSame
from timm.models.resnetv2 import ResNetV2, create_resnetv2_stem
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_hybrid import HybridEmbed
from torch import nn

from pipeline.config.params import ModelConfig
from pipeline.config.presets import ENCODER_PRESETS, EncoderSpec


class SizedHybridEmbed(HybridEmbed):
    """timm's `HybridEmbed` told its CNN map's size and stride, and so its width from the CNN's
    `num_features`, instead of learning them by running the CNN on a dummy image: on the meta
    device that forward is half of a network's build. (timm reads the width from `feature_info`,
    which `ResNetV2` keeps as a plain list, so it cannot be told the size without this.)"""

    def _init_backbone(self, *args, **kwargs):
        return super()._init_backbone(*args, feature_dim=self.backbone.num_features, **kwargs)


def build_vit(spec: EncoderSpec, num_classes: int = 0, initialise: bool = True) -> VisionTransformer:
    """timm's hybrid ViT for a preset: ResNetV2 stages (or, with none, its stem alone, as timm
    builds R-Ti), then patches of their last map into transformer blocks. Without `initialise`,
    timm's ViT initialisers are skipped: for weights that a state dict fills at once."""
    norm_layer = partial(GroupNormAct, num_groups=spec.norm_groups)
    if spec.cnn_layers:
        backbone = ResNetV2(
            layers=spec.cnn_layers, channels=spec.cnn_channels, stem_chs=spec.stem_channels,
            num_classes=0, global_pool="", preact=False, stem_type="same", conv_layer=StdConv2dSame,
            norm_layer=norm_layer,
        )
    else:
        backbone = create_resnetv2_stem(3, spec.stem_channels, stem_type="same", preact=False,
                                        conv_layer=StdConv2dSame, norm_layer=norm_layer)
        backbone.num_features = spec.stem_channels
    cnn_stride = spec.token_stride // spec.patch_size
    embed = partial(SizedHybridEmbed, backbone=backbone, feature_size=spec.img_size // cnn_stride,
                    feature_ratio=cnn_stride)
    return VisionTransformer(
        img_size=spec.img_size, patch_size=spec.patch_size, embed_dim=spec.embed_dim, depth=spec.depth,
        num_heads=spec.num_heads, mlp_ratio=spec.mlp_ratio, num_classes=num_classes, global_pool=spec.global_pool,
        fc_norm=False,  # normalise the tokens themselves: the decoder reads them, not only the pooled head
        embed_layer=embed, dynamic_img_size=True, weight_init="" if initialise else "skip",
    )


class HybridEncoder(nn.Module):
    """Returns the CNN skips (`spec.skips`, finest first) and the transformer output as a map
    at the tokens' stride (16 for the presets with three stages)."""

    def __init__(self, spec: EncoderSpec, initialise: bool = True):
        super().__init__()
        self.spec = spec
        self.vit = build_vit(spec, initialise=initialise)

    def cnn_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every CNN map, finest first: the stem's convolution, then the pooled stem (no stages)
        or each stage's output; the last is what the patch embedding reads."""
        backbone = self.vit.patch_embed.backbone
        stem = getattr(backbone, "stem", backbone)  # a ResNetV2, or its stem alone
        s2 = stem.norm(stem.conv(x))
        x = stem.pool(s2)
        maps = [s2]
        stages = getattr(backbone, "stages", [])
        if not len(stages):
            maps.append(x)
        for stage in stages:
            x = stage(x)
            maps.append(x)
        return maps

    def tokens(self, last: torch.Tensor) -> torch.Tensor:
        """Transformer output (prefix tokens included) for the CNN's last map."""
        x = self.vit.patch_embed.proj(last).permute(0, 2, 3, 1)  # NHWC, as dynamic_img_size expects
        x = self.vit.norm_pre(self.vit._pos_embed(x))
        return self.vit.norm(self.vit.blocks(x))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.cnn_features(x)
        tokens = self.tokens(maps[-1])[:, self.vit.num_prefix_tokens:]
        b, h, w = x.shape[0], x.shape[2] // self.spec.token_stride, x.shape[3] // self.spec.token_stride
        return [*maps[:len(self.spec.skips)], tokens.transpose(1, 2).reshape(b, -1, h, w)]

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
    """TransUNet's cascaded upsampler: a 3x3 conv on the token map, then one block per halving
    of its stride (four from stride 16), each with the encoder's skip at its stride if any."""

    def __init__(self, spec: EncoderSpec, in_channels: int, channels: tuple[int, ...]):
        super().__init__()
        self.conv_more = ConvBNReLU(spec.embed_dim, in_channels)
        skip_widths = dict(spec.skips)
        self.strides = [spec.token_stride >> (i + 1) for i in range(spec.decoder_blocks)]  # each block's output
        self.skip_strides = [stride for stride, _ in spec.skips]
        widths = (in_channels, *channels)
        self.blocks = nn.ModuleList(DecoderBlock(widths[i], skip_widths.get(stride, 0), widths[i + 1])
                                    for i, stride in enumerate(self.strides))
        self.out_channels = channels[-1]

    def forward(self, features: list[torch.Tensor], shift: torch.Tensor | None = None) -> torch.Tensor:
        *skips, top = features
        by_stride = dict(zip(self.skip_strides, skips))
        x = self.conv_more(top)
        if shift is not None:
            x = x + shift
        for block, stride in zip(self.blocks, self.strides):
            x = block(x, by_stride.get(stride))
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
                 out_channels: int, sigma_conditioning: bool = False, initialise: bool = True):
        super().__init__()
        self.encoder = HybridEncoder(spec, initialise)
        self.decoder = UNetDecoder(spec, decoder_in_channels, tuple(decoder_channels))
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


def pixel_vectors(maps: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """The C-vectors of N×C×H×W `maps` at flat indices `pixels` into N·H·W: M×C."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])[pixels]


class ProjectedSegmenter(nn.Module):
    """A segmenter that also returns L2-normalised embeddings of chosen pixels, a two-layer
    projection of its decoder features there, for the student's dense contrastive loss. Only the
    chosen pixels are projected: the loss samples a few dozen of a batch's ~10⁵, and projecting
    and normalising them all was a third of a student step. Export keeps `net` only."""

    def __init__(self, net: SegmentationNet, dim: int):
        super().__init__()
        self.net = net
        width = net.decoder.out_channels
        self.projection = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, dim))

    @property
    def encoder(self) -> HybridEncoder:
        return self.net.encoder

    def forward(self, x: torch.Tensor, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits N×K×H×W, embeddings M×D of the flat pixel indices `pixels` into N·H·W)."""
        features = self.net.decoder(self.net.encoder(x))
        return self.net.head(features), F.normalize(self.projection(pixel_vectors(features, pixels)), dim=1)


def build_network(model: ModelConfig, out_channels: int, sigma_conditioning: bool = False) -> SegmentationNet:
    """The TransUNet that params' `model` section describes, with an `out_channels` head."""
    return build_model(model.preset, model.decoder_in_channels, model.decoder_channels, out_channels,
                       sigma_conditioning)


class StateMismatch(ValueError):
    """A state dict that does not fit the network it should fill, its differences in one line."""


def module_from_state(build: Callable[[], nn.Module], state: dict) -> nn.Module:
    """The module `build` makes (pass it `initialise=False` where it takes one), holding every
    tensor of `state` (strict), each as its own would be: in its dtype (a file saved in half
    precision) and contiguous. Built on the meta device, so nothing is initialised only to be
    overwritten; a state that does not fit is a `StateMismatch`."""
    with torch.device("meta"):
        module = build()
    own = module.state_dict()
    problems = {"wrong shape": sorted(k for k in own if k in state and state[k].shape != own[k].shape),
                "missing": sorted(set(own) - set(state)), "unexpected": sorted(set(state) - set(own))}
    if any(problems.values()):
        raise StateMismatch(", ".join(f"{what} {keys[:3]}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}"
                                      for what, keys in problems.items() if keys))
    # assign=True keeps the module's requires_grad, so a frozen part stays frozen.
    module.load_state_dict({key: value.to(dtype=own[key].dtype, memory_format=torch.contiguous_format)
                            for key, value in state.items()}, assign=True)
    return module


def network_from_state(model: ModelConfig, out_channels: int, state: dict) -> SegmentationNet:
    """The network params' `model` describes, filled by `state` (`module_from_state`)."""
    return module_from_state(lambda: SegmentationNet(ENCODER_PRESETS[model.preset], model.decoder_in_channels,
                                                     tuple(model.decoder_channels), out_channels, initialise=False),
                             state)


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
