import torch

from pipeline.data import augment
from pipeline.data.shards import IGNORE_INDEX


def _image_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """An image whose every channel equals label/10, so image and label can be compared."""
    return (labels.float() / 10).unsqueeze(1).repeat(1, 3, 1, 1)


def test_geometry_moves_image_and_label_together():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (8, 16, 16), generator=g)
    # Blocky labels, so bilinear image sampling inside a block equals the nearest label.
    labels = labels.repeat_interleave(4, 1).repeat_interleave(4, 2)
    images = _image_from_labels(labels)
    out_images, out_labels = augment.random_view(images, labels, (0.5, 2.0), g, hflip=True)
    # Away from block borders (where bilinear blends neighbours) image and label must agree.
    as_float = out_labels.float().unsqueeze(1)
    flat = (torch.nn.functional.max_pool2d(as_float, 3, 1, 1) == -torch.nn.functional.max_pool2d(-as_float, 3, 1, 1))
    interior = flat.squeeze(1) & (out_labels != IGNORE_INDEX)
    assert interior.sum() > 500
    agree = (out_images[:, 0] * 10).round().long() == out_labels
    assert agree[interior].float().mean() > 0.99
    assert (out_labels == IGNORE_INDEX).any()  # zooming out pads with ignore


def test_identity_view_changes_nothing():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (2, 8, 8), generator=g)
    images = torch.rand(2, 3, 8, 8, generator=g)
    out_images, out_labels = augment.random_view(images, labels, (1.0, 1.0), g, hflip=False,
                                                 aspect_range=(1.0, 1.0))
    torch.testing.assert_close(out_images, images)
    assert torch.equal(out_labels, labels)


def test_flip_is_a_mirror():
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(8).repeat(8, 1).unsqueeze(0).repeat(64, 1, 1)
    _, out = augment.random_view(_image_from_labels(labels), labels, (1.0, 1.0), g, hflip=True,
                                 aspect_range=(1.0, 1.0))
    flipped = (out == labels.flip(-1)).all(dim=(1, 2))
    kept = (out == labels).all(dim=(1, 2))
    assert (flipped | kept).all() and flipped.any() and kept.any()


def test_color_jitter_keeps_the_unit_range():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 16, 16, generator=g)
    jittered = augment.color_jitter(images, 0.5, g)
    assert jittered.shape == images.shape and 0 <= jittered.min() and jittered.max() <= 1
    assert not torch.equal(jittered, images)


def test_several_label_maps_move_together_and_pad_with_ignore():
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 10, (4, 16, 16), generator=g)
    confidence = labels * 20  # a second map tied to the first pixel by pixel
    _, maps = augment.random_view(torch.rand(4, 3, 16, 16), torch.stack([labels, confidence], 1), (0.5, 2.0), g)
    inside = maps[:, 0] != IGNORE_INDEX
    assert torch.equal(maps[:, 1][inside], maps[:, 0][inside] * 20)
    assert torch.equal(maps[:, 1][~inside], maps[:, 0][~inside])  # both ignore where the view left the image


def test_config_knows_how_many_strong_ops_there_are():
    from pipeline.config.params import STRONG_OP_COUNT

    assert len(augment.STRONG_OPS) == STRONG_OP_COUNT


def test_every_strong_op_keeps_a_uint8_image_of_the_same_size_and_changes_it_at_full_magnitude():
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(3, 24, 24, generator=g) * 255).to(torch.uint8)
    for name, op in augment.STRONG_OPS.items():
        for magnitude in (0.0, 0.5, 1.0):
            out = op(image, magnitude, g)
            assert out.dtype == torch.uint8 and out.shape == image.shape, name
        assert not torch.equal(op(image, 1.0, g), image), name


def test_rand_augment_applies_the_asked_number_of_ops_per_image():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(6, 3, 16, 16, generator=g) * 255).to(torch.uint8)
    out = augment.rand_augment(images, 3, g)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert all(not torch.equal(a, b) for a, b in zip(out, images))


def test_strong_view_moves_labels_only_by_geometry():
    """Intensity ops never touch the labels: the label a strong view returns is the one the
    geometric view alone gives for the same draws."""
    from pipeline.config.params import StudentConfig
    from pipeline.train.steps import strong_view

    labels = torch.randint(0, 10, (4, 16, 16), generator=torch.Generator().manual_seed(1))
    maps = torch.stack([labels, labels], 1)
    images = (torch.rand(4, 3, 16, 16) * 255).to(torch.uint8)
    cfg = StudentConfig(randaug_ops=3)
    _, strong_maps = strong_view(images, maps, cfg, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    augment.rand_augment(images, 3, g)  # the same draws, results unused
    _, geometric_maps = augment.random_view(torch.zeros(4, 3, 16, 16), maps, (0.5, 2.0), g, hflip=cfg.hflip)
    assert torch.equal(strong_maps, geometric_maps)
