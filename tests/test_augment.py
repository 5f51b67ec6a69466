import torch

from pipeline import augment
from pipeline.data import IGNORE_INDEX


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


def test_intensity_ops_keep_range_and_take_no_labels():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 16, 16, generator=g)
    jittered = augment.color_jitter(images, 0.5, g)
    blurred = augment.gaussian_blur(images, 1.0, g)
    assert jittered.shape == images.shape and 0 <= jittered.min() and jittered.max() <= 1
    assert not torch.equal(blurred, images)


def test_cutout_greys_image_and_ignores_label_in_the_same_box():
    g = torch.Generator().manual_seed(1)
    images, labels = torch.rand(16, 3, 16, 16, generator=g), torch.zeros(16, 16, 16, dtype=torch.long)
    out_images, out_labels = augment.cutout(images, labels, 0.5, g)
    cut = out_labels == IGNORE_INDEX
    assert cut.any()
    assert torch.all(out_images.permute(1, 0, 2, 3)[:, cut] == 0.5)
    assert torch.equal(out_images.permute(1, 0, 2, 3)[:, ~cut], images.permute(1, 0, 2, 3)[:, ~cut])
