"""Exported weights: the DVC outputs that pass a model from one stage to the next.

A file holds the state dict plus what is needed to rebuild and check it (the kind of network,
the model config, the classes). Loading uses `weights_only=True`, so a file from elsewhere
cannot run code, and a mismatch gives an error that names the file.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.config.params import ModelConfig, release_advice
from pipeline.data.atomic import staged

if TYPE_CHECKING:
    from pipeline.models.transunet import SegmentationNet

ENCODER, DENOISER, SEGMENTER, TAG_CLASSIFIER = "encoder", "denoiser", "segmenter", "tag_classifier"
CLIP_TEXT = "clip_text"  # CLIP's zero-shot tag classifier: its text embeddings of the class names


class CheckpointError(ValueError):
    """A weights file that cannot be used where it was given."""


def save_weights(path: Path, state: dict, kind: str, model: ModelConfig, classes: list[str] | None) -> None:
    """Write atomically: a temp file renamed into place, so a killed stage leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged(path) as tmp:
        torch.save({"kind": kind, "model": asdict(model), "classes": classes, "state_dict": state}, tmp)


# torch's advice to retry with weights_only=False or to allowlist the file's globals (either
# would run code the file holds), and its pointers to docs and its issue tracker.
_TORCH_ADVICE = re.compile(r"weights_only|trust|file an issue|documentation|can still be loaded|alternatively|"
                           r"^Weights only load failed|^\(\d\)", re.IGNORECASE)


def load_failure(err: Exception) -> str:
    """What torch or safetensors says is wrong with a file, in one sentence, without the advice
    to load it unsafely."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).split("WeightsUnpickler error:")[-1]
    sentences = [s.strip() for s in re.split(r"(?<=\.)\s+|\n", text) if s.strip()]
    useful = [s for s in sentences if not _TORCH_ADVICE.search(s)]
    return (useful or ["it holds more than tensors and plain data"])[0].rstrip(".")


def read_payload(path: Path) -> dict:
    """The contents of a weights file written by `save_weights`, checked for its shape only."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"{path}: not a readable weights file ({load_failure(err)})") from None
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise CheckpointError(f"{path}: expected a file written by this pipeline (with a state_dict)")
    return payload


def load_weights(path: Path, kind: str, model: ModelConfig, classes: list[str] | None = None) -> dict:
    """Read a weights file written by `save_weights` and check it fits `model` and `classes`."""
    payload = read_payload(Path(path))
    if payload.get("kind") != kind:
        raise CheckpointError(f"{path}: holds a {payload.get('kind')!r} network, expected {kind!r}")
    # An encoder does not depend on the decoder widths; every other network does.
    built, wanted = payload.get("model") or {}, asdict(model)
    if (built.get("preset") != model.preset) if kind == ENCODER else (built != wanted):
        raise CheckpointError(f"{path}: built for model {built}, params say {wanted}")
    if classes is not None and payload.get("classes") != classes:
        raise CheckpointError(f"{path}: classes {payload.get('classes')} differ from the data's {classes}")
    return payload["state_dict"]


def encoder_weights(state: dict) -> dict:
    """The encoder's weights out of a trained wrapper's state (a classifier, or DenseCL's
    query branch), without any head."""
    return {k.removeprefix("encoder."): v for k, v in state.items()
            if k.startswith("encoder.") and not k.startswith("encoder.vit.head.")}


def segmenter_state(state: dict) -> dict:
    """The plain segmenter's weights out of a `ProjectedSegmenter` state (or a plain state)."""
    if not any(k.startswith("net.") for k in state):
        return state
    return {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}


def load_segmenter(path: Path, model: ModelConfig, classes: list[str]) -> SegmentationNet:
    """A fine-tuned network ready for inference."""
    from pipeline.models.transunet import network_from_state

    return network_from_state(model, len(classes), load_weights(path, SEGMENTER, model, classes)).eval()


def load_exported_segmenter(path: Path) -> tuple[SegmentationNet, list[str]]:
    """A segmenter rebuilt from its own file (the model config and classes it was saved with),
    for use outside the pipeline, e.g. by `pipeline.predict`."""
    payload = read_payload(path)
    if payload.get("kind") != SEGMENTER or not payload.get("classes"):
        raise CheckpointError(f"{path}: holds a {payload.get('kind')!r} network; expected a fine-tuned "
                              "segmenter (a teacher or student output)")
    classes = payload["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or len(classes) > 256:
        raise CheckpointError(f"{path}: classes {classes!r}: expected a list of at most 256 names (8-bit masks)")
    if not isinstance(payload.get("model"), dict):
        raise CheckpointError(f"{path}: has no model config (a 'model' entry); expected a file written by this pipeline")
    try:
        model = ModelConfig(**payload["model"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its model config does not fit this version ({err})") from None
    from pipeline.models.transunet import StateMismatch, network_from_state

    state = payload["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: its state_dict is not a mapping of names to tensors")
    try:
        return network_from_state(model, len(classes), state).eval(), classes
    except StateMismatch as err:
        raise CheckpointError(f"{path}: does not fit its own model config: {err}") from None


def load_external_encoder(path: Path, preset: str) -> dict:
    """Encoder weights from a file made elsewhere, e.g. timm's `vit_base_r50_s16_224` weights
    saved with `torch.save(model.state_dict(), path)` or as safetensors. A classifier head,
    `module.` prefixes and a wrapping {"state_dict": ...} are accepted; any missing or
    mis-shaped encoder weight is an error naming the keys."""
    if not path.is_file():
        raise CheckpointError(f"{path}: encoder.weights_path does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch/safetensors raise many types for a bad file
        raise CheckpointError(f"{path}: not a readable weights file ({load_failure(err)})") from None
    raw = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    return _fitted_encoder({k.removeprefix("module.").removeprefix("vit."): v for k, v in raw.items()}, preset, str(path))


def load_hub_encoder(preset: str, name: str, weights_path: str | None = None) -> dict:
    """Published weights of the preset's network through timm's own pretrained machinery: the
    release `name` (timm's model name with its tag, e.g. vit_base_r50_s16_224.orig_in21k;
    `EncoderConfig.release` picks it) from the Hugging Face hub into its cache, or from the
    cache alone (HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE are honoured), or from
    `weights_path`, a downloaded copy of that release. Either way timm fits them to the preset:
    the positional embedding resampled to its image size, the release's classifier dropped."""
    import timm
    from huggingface_hub import constants

    from pipeline.models.transunet import ENCODER_PRESETS

    if name not in timm.list_pretrained(name):
        raise CheckpointError(f"encoder.timm_name: {name!r} is not a release timm publishes weights for "
                              "(`timm.list_pretrained()` lists them; e.g. vit_base_r50_s16_384.orig_in21k_ft_in1k)")
    if weights_path and not Path(weights_path).is_file():
        raise CheckpointError(f"{weights_path}: encoder.weights_path does not exist")
    try:
        hub = timm.create_model(name, pretrained=True, num_classes=0, img_size=ENCODER_PRESETS[preset].img_size,
                                pretrained_cfg_overlay={"file": weights_path} if weights_path else None)
    except Exception as err:  # noqa: BLE001 - the hub, the network and the file raise many types
        if weights_path:
            raise CheckpointError(f"{weights_path}: not readable as {name} weights ({load_failure(err)})") from None
        where = "HF_HUB_OFFLINE is set and they are not" if constants.HF_HUB_OFFLINE else "they are not"
        raise CheckpointError(
            f"encoder.init 'timm': {name} weights could not be fetched from the Hugging Face hub and {where} in its "
            f"cache {constants.HF_HUB_CACHE} ({load_failure(err)}); {release_advice(name)}") from None
    return _fitted_encoder(hub.state_dict(), preset, name)


def _fitted_encoder(vit: dict, preset: str, source: str) -> dict:
    """ViT state-dict entries (no `vit.` prefix) as the preset's encoder weights; a classifier
    head is dropped, any missing or mis-shaped weight is an error naming the keys."""
    from pipeline.models.transunet import ENCODER_PRESETS, HybridEncoder

    with torch.device("meta"):  # shapes only: no memory
        encoder = HybridEncoder(ENCODER_PRESETS[preset], initialise=False)
    expected = {k.removeprefix("vit."): v.shape for k, v in encoder.state_dict().items()
                if not k.startswith("vit.head.")}
    missing = sorted(set(expected) - set(vit))
    wrong = sorted(k for k in expected if k in vit and tuple(vit[k].shape) != tuple(expected[k]))
    if missing or wrong:
        raise CheckpointError(f"{source}: does not fit model.preset {preset!r}: "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"wrong shape {wrong[:5]}{'...' if len(wrong) > 5 else ''}")
    return {f"vit.{k}": vit[k] for k in expected}
