"""The encoder presets: widths and depths of each TransUNet encoder, by name. Kept free of
torch and timm so that params can be validated, and a stage's driver can run, without them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncoderSpec:
    """Widths and depths of one encoder preset: a ResNetV2 (its stem, then one stage per entry
    of `cnn_layers`, the first at stride 4, each next one halving; none: the stem alone), then
    `patch_size`² patches of its last map into transformer tokens."""

    cnn_layers: tuple[int, ...]
    cnn_channels: tuple[int, ...]
    stem_channels: int
    norm_groups: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    img_size: int
    global_pool: str = "token"
    patch_size: int = 1
    # timm's name, with its pretrained tag, of the same network with published weights
    # (`encoder.init: timm` loads them through timm's hub machinery); None: there are none.
    timm_name: str | None = None

    @property
    def token_stride(self) -> int:
        return 4 * 2 ** max(len(self.cnn_layers) - 1, 0) * self.patch_size

    @property
    def skips(self) -> tuple[tuple[int, int], ...]:
        """(stride, channels) of each CNN map finer than the tokens, finest first: the stem's
        convolution at 2, then its pooled map (when there are no stages) or each stage's."""
        maps = [(4, self.stem_channels)] if not self.cnn_layers else \
            [(4 * 2 ** i, width) for i, width in enumerate(self.cnn_channels[:len(self.cnn_layers)])]
        return ((2, self.stem_channels), *((s, c) for s, c in maps if s < self.token_stride))

    @property
    def decoder_blocks(self) -> int:
        """Upsampling blocks from the tokens to full resolution: one per halving of the stride."""
        return self.token_stride.bit_length() - 1


ENCODER_PRESETS = {
    "tiny": EncoderSpec(cnn_layers=(1, 1, 1), cnn_channels=(64, 128, 256), stem_channels=32,
                        norm_groups=8, embed_dim=128, depth=2, num_heads=4, mlp_ratio=2.0, img_size=64,
                        global_pool="avg"),
    "r50_vit_b16": EncoderSpec(cnn_layers=(3, 4, 9), cnn_channels=(256, 512, 1024), stem_channels=64,
                               norm_groups=32, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                               img_size=224, timm_name="vit_base_r50_s16_224.orig_in21k"),
    # timm's ViT-Ti hybrid (R-Ti/16+8): the ResNet stem alone, 8×8 patches of its stride-4 map,
    # so tokens at stride 32; small enough for a CPU, with published ImageNet-21k weights.
    "vit_tiny_r_s16_p8": EncoderSpec(cnn_layers=(), cnn_channels=(), stem_channels=64, norm_groups=32,
                                     embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0, img_size=224,
                                     patch_size=8, timm_name="vit_tiny_r_s16_p8_224.augreg_in21k"),
}
