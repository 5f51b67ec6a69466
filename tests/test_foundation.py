"""The foundation-model pseudo-mask sources, loaded through their hubs' own machinery from
weights these tests save (nothing is downloaded here): a tiny CLIP as an open_clip `local-dir:`
folder, the layout `hf-hub:` repositories have, and timm's DINO ViT-S/16 from a weights file."""

import pytest
import torch
from conftest import DINO

from pipeline.models.foundation import (
    ClipScores,
    DinoAttention,
    FoundationError,
    attention_guidance,
    clip_text,
    load_clip,
    load_dino,
)

CLASSES = ["stripes", "dots", "star"]


def test_clip_loads_from_its_folder_and_scores_every_patch_against_each_class(clip_dir):
    import open_clip

    folder, saved = clip_dir
    loaded_model, tokenizer = load_clip(f"local-dir:{folder}")
    scores = ClipScores(loaded_model, clip_text(loaded_model, tokenizer, CLASSES))
    bare = ClipScores(saved, clip_text(saved, open_clip.get_tokenizer(f"local-dir:{folder}"), CLASSES))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        loaded = scores(x)
        torch.testing.assert_close(loaded, bare(x))  # the saved weights, not a fresh model's
    # Cosines on CLIP's 4×4 grid, of the three classes and the background prompt.
    assert loaded.shape == (2, 4, 4, 4) and loaded.abs().max() <= 1 + 1e-5
    with torch.no_grad():
        maps = scores.class_maps(x, torch.tensor([[True, False, True], [False, False, False]]), (64, 64))
    assert maps.shape == (2, 3, 64, 64) and not maps[0, 1].any() and not maps[1].any()
    # Each pixel's probabilities of its tags, the background prompt taking the rest.
    assert (maps[0].sum(dim=0) < 1).all() and (maps[0, [0, 2]] > 0).all()


def test_class_names_embedded_by_another_clip_are_refused_in_one_line(clip_dir):
    _, saved = clip_dir
    with pytest.raises(FoundationError, match=r"image embeddings have 32 dimensions, the class names' 8: "
                                              r"they come from another CLIP \(rerun tag_classifier\)"):
        ClipScores(saved, torch.zeros(len(CLASSES) + 1, 8))


def test_a_clip_that_cannot_be_loaded_is_named_in_one_line(tmp_path):
    with pytest.raises(FoundationError, match=r"^incremental.masks.clip 'local-dir:.*': could not be loaded \("):
        load_clip(f"local-dir:{tmp_path / 'none'}")


def test_dino_loads_timms_vit_from_a_weights_file_and_gives_each_patchs_attention(dino_file, tmp_path):
    weights, saved = dino_file
    attention = load_dino(DINO, weights)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        rows = attention(x)
        torch.testing.assert_close(rows, DinoAttention(saved)(x))
    assert rows.shape == (1, 196, 196)  # 14×14 patches at timm's 224 px
    assert (rows.sum(dim=-1) <= 1 + 1e-5).all()  # a softmax row, less what went to the class token
    with pytest.raises(FoundationError, match=rf"^incremental.masks.dino '{DINO}': could not be "
                                              r"loaded from .*missing.safetensors"):
        load_dino(DINO, tmp_path / "missing.safetensors")


def test_seeds_inside_an_object_pick_the_patches_their_patch_attends_to():
    """A 2×2 grid where the left patches attend to the left column alone: a seed on the left of
    an 8×8 image grows its class over the left half."""
    attention = torch.zeros(1, 4, 4)
    left, right = [0, 2], [1, 3]
    for p in left:
        attention[0, p, left] = 0.5
    for p in right:
        attention[0, p, right] = 0.5
    initial = torch.zeros(1, 8, 8, dtype=torch.uint8)
    initial[0, 5, 1] = 2  # class 2's one initial pixel, bottom left
    guided = attention_guidance(attention, initial, 2, seeds=3, threshold=0.5, generator=torch.Generator().manual_seed(0))
    assert not guided[0, 0].any()  # class 1: no initial pixel
    assert guided[0, 1, :, :3].all() and not guided[0, 1, :, 5:].any()
