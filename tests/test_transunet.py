import pytest
import timm
import torch
from timm.layers import HybridEmbed

from pipeline.config.params import ModelConfig
from pipeline.models.checkpoints import segmenter_state
from pipeline.models.transunet import (
    ENCODER_PRESETS,
    EncoderClassifier,
    HybridEncoder,
    ProjectedSegmenter,
    SizedHybridEmbed,
    StateMismatch,
    build_model,
    build_vit,
    mixed_precision,
    network_from_state,
    pixel_vectors,
)


@pytest.mark.parametrize("preset, size, widths, din", [
    ("tiny", 64, [64, 32, 16, 16], 128),
    ("r50_vit_b16", 32, [256, 128, 64, 16], 512),
    ("vit_tiny_r_s16_p8", 64, [128, 64, 32, 16, 16], 128),
])
def test_shapes_for_every_preset(preset, size, widths, din):
    spec = ENCODER_PRESETS[preset]
    model = build_model(preset, din, widths, 5).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        *skips, tokens = model.encoder(x)
        out = model(x)
    assert [(f.shape[1], size // f.shape[2], size // f.shape[3]) for f in skips] == [(c, s, s) for s, c in spec.skips]
    assert tokens.shape == (2, spec.embed_dim, size // spec.token_stride, size // spec.token_stride)
    assert len(model.decoder.blocks) == spec.decoder_blocks == len(widths)
    assert out.shape == (2, 5, size, size)
    # Built for a state dict to fill: nothing initialised, then every tensor the state's.
    filled = network_from_state(ModelConfig(preset, din, widths), 5, model.state_dict())
    # A buffer outside the state dict (persistent=False) would stay on the meta device.
    assert not any(t.is_meta for t in [*filled.parameters(), *filled.buffers()])
    with torch.no_grad():
        assert torch.equal(filled.eval()(x), out)


def test_a_state_that_does_not_fit_is_named_in_one_line():
    model = ModelConfig("tiny", 128, [64, 32, 16, 16])
    state = build_model("tiny", 128, [64, 32, 16, 16], 5).state_dict()
    state["head.weight"] = state["head.weight"][:3]
    del state["head.bias"]
    state["extra"] = torch.zeros(1)
    with pytest.raises(StateMismatch, match=r"^wrong shape \['head.weight'\], missing \['head.bias'\], "
                                            r"unexpected \['extra'\]$"):
        network_from_state(model, 5, state)


@pytest.mark.parametrize("preset", sorted(ENCODER_PRESETS))
def test_the_cnn_maps_size_given_is_the_size_timm_measures_by_running_it(preset):
    """`SizedHybridEmbed` is told what timm's `HybridEmbed` learns from a dummy forward."""
    told = build_vit(ENCODER_PRESETS[preset]).patch_embed
    assert isinstance(told, SizedHybridEmbed)
    measured = HybridEmbed(told.backbone, img_size=told.img_size, patch_size=told.patch_size,
                           embed_dim=told.proj.out_channels)
    def sizes(embed):
        return [tuple(getattr(embed, k)) for k in ("img_size", "patch_size", "feature_size", "feature_ratio",
                                                   "grid_size")] + [embed.feature_dim, embed.num_patches]
    assert sizes(told) == sizes(measured)


def test_presets_put_their_skips_below_the_tokens_stride():
    assert (ENCODER_PRESETS["tiny"].skips, ENCODER_PRESETS["tiny"].token_stride) == (((2, 32), (4, 64), (8, 128)), 16)
    assert ENCODER_PRESETS["r50_vit_b16"].skips == ((2, 64), (4, 256), (8, 512))
    hybrid = ENCODER_PRESETS["vit_tiny_r_s16_p8"]  # the stem alone: its convolution and its pooled map
    assert (hybrid.skips, hybrid.token_stride, hybrid.decoder_blocks) == (((2, 64), (4, 64)), 32, 5)


def test_r50_preset_is_exactly_timms_vit_base_r50_s16_224():
    """Same keys and shapes, so a locally saved timm checkpoint loads into the encoder."""
    reference = timm.create_model("vit_base_r50_s16_224", pretrained=False, num_classes=0)
    ours = build_vit(ENCODER_PRESETS["r50_vit_b16"])
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
           {k: v.shape for k, v in reference.state_dict().items()}


def test_encoder_has_no_batchnorm_and_decoder_does():
    model = build_model("tiny", 128, [64, 32, 16, 16], 3)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.encoder.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.decoder.modules())


def test_replace_head_keeps_encoder_and_decoder():
    model = build_model("tiny", 128, [64, 32, 16, 16], 3)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    model.replace_head(11)
    assert model.head.out_channels == 11
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_classifier_encoder_state_loads_into_a_plain_encoder():
    clf = EncoderClassifier(ENCODER_PRESETS["tiny"], 10)
    assert clf(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    HybridEncoder(ENCODER_PRESETS["tiny"]).load_state_dict(clf.encoder_state())


def test_sigma_conditioning_feeds_the_noise_level_and_is_left_out_of_the_segmenter_weights():
    torch.manual_seed(0)
    model = build_model("tiny", 128, [64, 32, 16, 16], 3, sigma_conditioning=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        low, high = model(x, torch.tensor([0.1, 0.1])), model(x, torch.tensor([0.8, 0.8]))
    assert not torch.allclose(low, high)
    plain = build_model("tiny", 128, [64, 32, 16, 16], 3)
    plain.load_state_dict(model.without_noise_level())  # strict: exactly the unconditioned network


def test_projected_segmenter_embeds_the_chosen_pixels_and_exports_the_plain_network():
    torch.manual_seed(0)
    net = build_model("tiny", 32, [16, 8, 8, 8], 5)
    wrapped = ProjectedSegmenter(net, 12).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits, every = wrapped(x, torch.arange(2 * 32 * 32))
        _, some = wrapped(x, torch.tensor([5, 1024 + 33]))  # (image 0, row 0, col 5), (image 1, row 1, col 1)
    assert logits.shape == (2, 5, 32, 32) and every.shape == (2 * 32 * 32, 12)
    torch.testing.assert_close(every.norm(dim=1), torch.ones(2 * 32 * 32))
    torch.testing.assert_close(some, every[[5, 1024 + 33]])
    features = net.decoder(net.encoder(x)).detach()
    torch.testing.assert_close(pixel_vectors(features, torch.tensor([1024 + 33])), features[1:, :, 1, 1])
    plain = build_model("tiny", 32, [16, 8, 8, 8], 5).eval()
    plain.load_state_dict(segmenter_state(wrapped.state_dict()))  # strict: no projection weights left
    torch.testing.assert_close(plain(x), logits)
    assert segmenter_state(plain.state_dict()).keys() == plain.state_dict().keys()


def test_mixed_precision_leaves_cpu_runs_in_float32_and_bit_identical():
    model = build_model("tiny", 128, [64, 32, 16, 16], 5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        with mixed_precision(torch.device("cpu")):
            mixed = model(x)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)


def test_the_cpu_hybrid_preset_is_exactly_timms_vit_tiny_r_s16_p8_224():
    """Same keys and shapes as timm's R-Ti/16+8 (its backbone the ResNet stem alone), so its
    published ImageNet-21k weights load; and the same features for the same weights."""
    reference = timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, num_classes=0).eval()
    encoder = HybridEncoder(ENCODER_PRESETS["vit_tiny_r_s16_p8"]).eval()
    assert {k: v.shape for k, v in encoder.vit.state_dict().items()} == \
           {k: v.shape for k, v in reference.state_dict().items()}
    encoder.vit.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = encoder(x)[-1].flatten(2).transpose(1, 2)
        expected = reference.forward_features(x)[:, reference.num_prefix_tokens:]
    torch.testing.assert_close(tokens, expected, rtol=1e-3, atol=1e-3)
