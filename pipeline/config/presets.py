"""The encoder presets: widths and depths of each TransUNet encoder, by name. Kept free of
torch and timm so that params can be validated, and a stage's driver can run, without them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncoderSpec:
    """Widths and depths of one encoder preset."""

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
    # timm's name, with its pretrained tag, of the same network with published weights
    # (`encoder.init: timm` loads them through timm's hub machinery); None: there are none.
    timm_name: str | None = None

    @property
    def skip_channels(self) -> tuple[int, int, int]:
        """Channels of the CNN features at strides 2, 4 and 8."""
        return self.stem_channels, self.cnn_channels[0], self.cnn_channels[1]


ENCODER_PRESETS = {
    "tiny": EncoderSpec(cnn_layers=(1, 1, 1), cnn_channels=(64, 128, 256), stem_channels=32,
                        norm_groups=8, embed_dim=128, depth=2, num_heads=4, mlp_ratio=2.0, img_size=64,
                        global_pool="avg"),
    "r50_vit_b16": EncoderSpec(cnn_layers=(3, 4, 9), cnn_channels=(256, 512, 1024), stem_channels=64,
                               norm_groups=32, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                               img_size=224, timm_name="vit_base_r50_s16_224.orig_in21k"),
}
