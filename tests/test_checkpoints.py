import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.models.checkpoints import (
    DENOISER,
    ENCODER,
    SEGMENTER,
    CheckpointError,
    load_exported_segmenter,
    load_external_encoder,
    load_hub_encoder,
    load_segmenter,
    load_weights,
    save_weights,
)
from pipeline.config.params import EncoderConfig, ModelConfig, release_advice
from pipeline.models.transunet import ENCODER_PRESETS, build_model, build_vit

MODEL = ModelConfig()
ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["bg", "a", "b"]


def test_round_trip_and_checks(tmp_path):
    net = build_model(MODEL.preset, MODEL.decoder_in_channels, MODEL.decoder_channels, len(CLASSES))
    path = tmp_path / "m.pt"
    save_weights(path, net.state_dict(), SEGMENTER, MODEL, CLASSES)
    assert not list(tmp_path.glob(".*tmp"))  # written through a temp file, renamed into place
    loaded = load_segmenter(path, MODEL, CLASSES)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in net.state_dict().items())
    with pytest.raises(CheckpointError, match="expected 'denoiser'"):
        load_weights(path, DENOISER, MODEL)
    with pytest.raises(CheckpointError, match="classes"):
        load_weights(path, SEGMENTER, MODEL, ["x", "y", "z"])
    with pytest.raises(CheckpointError, match="built for model"):
        load_weights(path, SEGMENTER, ModelConfig(decoder_channels=[32, 32, 16, 16]), CLASSES)


def test_encoder_weights_ignore_decoder_widths(tmp_path):
    path = tmp_path / "enc.pt"
    save_weights(path, {"w": torch.zeros(1)}, ENCODER, MODEL, None)
    assert "w" in load_weights(path, ENCODER, ModelConfig(decoder_channels=[32, 32, 16, 16]))
    with pytest.raises(CheckpointError, match="built for model"):
        load_weights(path, ENCODER, ModelConfig(preset="r50_vit_b16", decoder_in_channels=512,
                                                decoder_channels=[256, 128, 64, 16]))


def test_garbage_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt: not a readable weights file"):
        load_weights(path, SEGMENTER, MODEL)


def test_external_timm_style_encoder_loads(tmp_path):
    """A state dict as timm saves it (no `vit.` prefix, a classifier head) loads into our encoder."""
    vit = build_vit(ENCODER_PRESETS["tiny"], num_classes=7)
    path = tmp_path / "timm.pth"
    torch.save(vit.state_dict(), path)
    weights = load_external_encoder(path, "tiny")
    assert all(k.startswith("vit.") for k in weights) and not any(".head." in k for k in weights)
    net = build_model("tiny", 128, [64, 32, 16, 16], 3)
    net.encoder.load_state_dict(weights)
    torch.testing.assert_close(net.encoder.vit.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)


def test_external_encoder_for_another_architecture_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(CheckpointError, match="does not fit model.preset 'tiny'"):
        load_external_encoder(path, "tiny")


def test_a_failed_write_leaves_neither_the_file_nor_a_temp(tmp_path, monkeypatch):
    import errno

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_weights(tmp_path / "m.pt", {}, SEGMENTER, MODEL, CLASSES)
    assert list(tmp_path.iterdir()) == []


class _Armed:
    """Unpickling this creates `marker`: stands for any code a crafted file could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_file_that_would_run_code_is_refused_without_torchs_unsafe_hint(tmp_path):
    """torch's message says re-running with weights_only=False "will likely succeed": the one
    thing not to do with a file from elsewhere. The error keeps what is wrong, in one line."""
    path = tmp_path / "armed.pt"
    torch.save({"state_dict": _Armed(tmp_path / "ran")}, path)
    for load in (lambda: load_weights(path, SEGMENTER, MODEL), lambda: load_external_encoder(path, "tiny")):
        with pytest.raises(CheckpointError, match="armed.pt: not a readable weights file") as info:
            load()
        message = str(info.value)
        assert "weights_only" not in message and "likely succeed" not in message and "\n" not in message
        assert "GLOBAL" in message  # the meaningful part: what the file tried to load
    assert not (tmp_path / "ran").exists()


def test_an_exported_segmenter_without_its_config_or_with_another_networks_weights_is_refused(tmp_path):
    net = build_model(MODEL.preset, MODEL.decoder_in_channels, MODEL.decoder_channels, len(CLASSES))
    no_config = tmp_path / "no_config.pt"
    torch.save({"kind": SEGMENTER, "classes": CLASSES, "state_dict": net.state_dict()}, no_config)
    with pytest.raises(CheckpointError, match="no_config.pt: .*model config"):
        load_exported_segmenter(no_config)
    other = tmp_path / "other.pt"  # 3 classes' weights, saved as a 2-class segmenter
    save_weights(other, net.state_dict(), SEGMENTER, MODEL, ["bg", "a"])
    with pytest.raises(CheckpointError, match="other.pt: .*wrong shape") as info:
        load_exported_segmenter(other)
    assert "\n" not in str(info.value)
    missing = tmp_path / "missing.pt"
    save_weights(missing, {k: v for k, v in net.state_dict().items() if "decoder" not in k}, SEGMENTER, MODEL, CLASSES)
    with pytest.raises(CheckpointError, match="missing.pt: .*missing"):
        load_exported_segmenter(missing)


def test_an_exported_segmenter_saved_in_half_precision_predicts_in_float32(tmp_path):
    net = build_model(MODEL.preset, MODEL.decoder_in_channels, MODEL.decoder_channels, len(CLASSES)).eval()
    half = tmp_path / "half.pt"
    save_weights(half, {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()},
                 SEGMENTER, MODEL, CLASSES)
    loaded, classes = load_exported_segmenter(half)
    assert classes == CLASSES and {p.dtype for p in loaded.parameters()} == {torch.float32}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x), atol=0.05)


# `encoder.init: timm`, offline: the weights a release publishes are stood in for by timm's own
# model of that architecture, saved where the hub (or a user's download) would put them.
R50 = "r50_vit_b16"


def _published(architecture: str, **kwargs) -> dict:
    """Random weights of timm's `architecture`: its shapes taken on the meta device (no slow
    initialisation of a hundred million weights)."""
    import timm

    with torch.device("meta"):
        shapes = timm.create_model(architecture, pretrained=False, **kwargs).state_dict()
    generator = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=generator) for k, v in shapes.items()}


def _load_hub_encoder_in(env: dict, out: Path) -> subprocess.CompletedProcess:
    """load_hub_encoder in a process of its own: the hub reads HF_* variables as it is imported."""
    code = ("import sys; from safetensors.torch import save_file; from pipeline.models.checkpoints import "
            f"CheckpointError, load_hub_encoder\ntry:\n    save_file(load_hub_encoder({R50!r}, {ENCODER_PRESETS[R50].timm_name!r}), sys.argv[1])\n"
            "except CheckpointError as err:\n    sys.exit(f'error: {err}')")
    return subprocess.run([sys.executable, "-c", code, str(out)], env={**os.environ, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)


def test_the_presets_release_loads_from_the_hub_cache_offline(tmp_path):
    from safetensors.torch import load_file, save_file

    name = ENCODER_PRESETS[R50].timm_name
    saved = _published(name.split(".")[0], num_classes=0)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / f"models--timm--{name}"  # the hub cache's layout, as a download leaves it
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file(saved, repo / "snapshots" / commit / "model.safetensors")
    out = tmp_path / "encoder.safetensors"
    done = _load_hub_encoder_in({"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}, out)
    assert done.returncode == 0, done.stderr
    loaded = load_file(out)
    assert set(loaded) == {f"vit.{k}" for k in saved}
    assert all(torch.equal(loaded[f"vit.{k}"], v) for k, v in saved.items())


def test_offline_and_not_in_the_cache_is_one_line_naming_the_release_the_cache_and_the_way_out(tmp_path):
    done = _load_hub_encoder_in({"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}, tmp_path / "x")
    assert done.returncode == 1
    message = done.stderr.strip()
    assert message.startswith("error: encoder.init 'timm': vit_base_r50_s16_224.orig_in21k weights") and "\n" not in message
    assert f"HF_HUB_OFFLINE is set and they are not in its cache {tmp_path / 'empty'}" in message
    assert message.endswith(release_advice("vit_base_r50_s16_224.orig_in21k"))  # the same advice as before the run


def test_a_downloaded_copy_of_another_release_is_fitted_by_timm_to_the_presets_size_and_head(tmp_path):
    """The 384-pixel ImageNet-1k release of the same network, with its 1,000-class head: timm
    resamples its positional embedding to the preset's 224 pixels and drops the head."""
    from timm.layers import resample_abs_pos_embed

    saved = _published("vit_base_r50_s16_384", num_classes=1000)
    path = tmp_path / "vit_base_r50_s16_384.pth"
    torch.save(saved, path)
    weights = load_hub_encoder(R50, "vit_base_r50_s16_384.orig_in21k_ft_in1k", str(path))
    assert weights["vit.pos_embed"].shape == (1, 1 + 14 * 14, 768) and saved["pos_embed"].shape == (1, 1 + 24 * 24, 768)
    torch.testing.assert_close(weights["vit.pos_embed"],
                               resample_abs_pos_embed(saved["pos_embed"], new_size=[14, 14], num_prefix_tokens=1))
    assert not any(k.startswith("vit.head") for k in weights)
    assert torch.equal(weights["vit.blocks.11.mlp.fc2.weight"], saved["blocks.11.mlp.fc2.weight"])
    with pytest.raises(CheckpointError, match="'vit_base_r50_s16_999.x' is not a release timm publishes"):
        load_hub_encoder(R50, "vit_base_r50_s16_999.x", str(path))
    path.write_bytes(b"not weights")
    with pytest.raises(CheckpointError, match="vit_base_r50_s16_384.pth: not readable as vit_base_r50_s16_384"):
        load_hub_encoder(R50, "vit_base_r50_s16_384.orig_in21k_ft_in1k", str(path))


def test_the_cpu_hybrid_presets_release_loads_with_its_21k_class_head_dropped(tmp_path):
    saved = _published("vit_tiny_r_s16_p8_224", num_classes=21843)
    path = tmp_path / "vit_tiny_r_s16_p8_224.safetensors"
    from safetensors.torch import save_file

    save_file(saved, path)
    weights = load_hub_encoder("vit_tiny_r_s16_p8", EncoderConfig(init="timm").release("vit_tiny_r_s16_p8"), str(path))
    assert set(weights) == {f"vit.{k}" for k in saved if not k.startswith("head.")}
    assert torch.equal(weights["vit.patch_embed.backbone.conv.weight"], saved["patch_embed.backbone.conv.weight"])
    build_model("vit_tiny_r_s16_p8", 128, [128, 64, 32, 16, 16], 3).encoder.load_state_dict(weights)
