import torch

from pipeline.models.tag_masks import (
    TagClassifier,
    activation_maps,
    fuse,
    initial_masks,
    seeds_guidance,
)
from pipeline.models.transunet import ENCODER_PRESETS, HybridEncoder, module_from_state


def test_the_classifier_scores_images_by_the_mean_of_its_activation_maps():
    model = TagClassifier(HybridEncoder(ENCODER_PRESETS["tiny"]), 3).eval()
    with torch.no_grad():
        logits, maps = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3) and maps.shape == (2, 3, 4, 4)  # the CNN's last map, at stride 16
    torch.testing.assert_close(logits, maps.mean(dim=(2, 3)))



def test_a_classifier_its_weights_fill_scores_the_same_and_keeps_its_transformer_frozen():
    source = TagClassifier(HybridEncoder(ENCODER_PRESETS["tiny"]), 3).eval()
    filled = module_from_state(lambda: TagClassifier(HybridEncoder(ENCODER_PRESETS["tiny"], initialise=False), 3),
                               source.state_dict()).eval()
    assert [p.requires_grad for p in filled.parameters()] == [p.requires_grad for p in source.parameters()]
    assert not all(p.requires_grad for p in filled.parameters())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(filled(x)[1], source(x)[1])

def test_activation_maps_are_scaled_per_class_and_only_for_the_tags():
    maps = torch.tensor([[[[2.0, -1.0], [1.0, 0.0]], [[0.5, 0.5], [0.5, 0.25]]]])  # 1×2×2×2
    cams = activation_maps(maps, torch.tensor([[True, False]]), (2, 2))
    assert cams[0, 0].tolist() == [[1.0, 0.0], [0.5, 0.0]]  # negative scores cut, peak at 1
    assert not cams[0, 1].any()  # an untagged class lights nothing, however high its scores
    assert activation_maps(maps, torch.tensor([[True, True]]), (4, 4)).shape == (1, 2, 4, 4)


def test_the_initial_mask_takes_the_highest_map_above_the_background_level():
    cams = torch.tensor([[[[0.9, 0.2, 0.6]], [[0.1, 0.3, 0.7]]]])  # 1×2×1×3
    assert initial_masks(cams, background=0.5).tolist() == [[[1, 0, 2]]]
    assert initial_masks(cams, background=0.8).tolist() == [[[1, 0, 0]]]
    assert initial_masks(cams, background=0.5).dtype == torch.uint8


def _two_objects():
    """A 1×2×4×6 feature map: the left four columns one object (feature a), the right two
    another (feature b, orthogonal to a)."""
    features = torch.zeros(1, 2, 4, 6)
    features[0, 0, :, :4] = 1.0
    features[0, 1, :, 4:] = 1.0
    return features


def test_seeds_grow_a_class_over_the_whole_object_they_fall_on():
    initial = torch.zeros(1, 4, 6, dtype=torch.uint8)
    initial[0, 1, 1] = 1  # the CAM lit one pixel of the left object
    guided = seeds_guidance(_two_objects(), initial, 2, seeds=9, threshold=0.5,
                            generator=torch.Generator().manual_seed(0))
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[:, :4] = True
    assert torch.equal(guided[0, 0], expected)
    assert not guided[0, 1].any()  # no initial pixel, no seeds



def test_seeds_guide_each_image_of_a_batch_by_its_own_classes():
    initial = torch.zeros(2, 4, 6, dtype=torch.uint8)
    initial[0, 2, 0] = 1  # image 0: the left object is class 1
    initial[1, 0, 5] = 2  # image 1: the right object is class 2
    guided = seeds_guidance(_two_objects().expand(2, -1, -1, -1), initial, 2, seeds=4, threshold=0.5,
                            generator=torch.Generator().manual_seed(0))
    left = torch.zeros(4, 6, dtype=torch.bool)
    left[:, :4] = True
    assert torch.equal(guided[0, 0], left) and torch.equal(guided[1, 1], ~left)
    assert not guided[0, 1].any() and not guided[1, 0].any()

def test_fusion_is_the_union_per_class():
    initial = torch.tensor([[[1, 0, 2]]], dtype=torch.uint8)
    guided = torch.tensor([[[[False, True, False]], [[False, False, False]]]])
    assert fuse(initial, guided).tolist() == [[[[True, True, False]], [[False, False, True]]]]


def test_only_the_cnn_and_the_scores_train():
    """What the forward pass does not use must not wait for a gradient (DDP on several workers)."""
    model = TagClassifier(HybridEncoder(ENCODER_PRESETS["tiny"]), 2)
    model(torch.randn(1, 3, 64, 64))[0].sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    assert any(p.requires_grad for p in model.encoder.parameters())
