import torch

from pipeline.data.copy_paste import InstanceBank


def _labeled():
    """Two 16×16 images: a 4×4 square of class 2 and a 3×5 bar of class 3 on background 0."""
    images = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    masks = torch.zeros(2, 16, 16, dtype=torch.long)
    masks[0, 2:6, 2:6] = 2
    images[0, :, 2:6, 2:6] = 200
    masks[1, 8:11, 4:9] = 3
    images[1, :, 8:11, 4:9] = 100
    masks[1, 0, 0] = 3  # a one-pixel speck: too small to be an object
    return images, masks


def test_bank_holds_connected_objects_per_class_without_excluded_classes_or_specks():
    images, masks = _labeled()
    bank = InstanceBank(images, masks, num_classes=4, per_class=5, generator=torch.Generator().manual_seed(0),
                        exclude=frozenset({0}), min_pixels=4)
    assert set(bank.by_class) == {2, 3} and len(bank) == 2
    square = bank.by_class[2][0]
    assert square.mask.shape == (4, 4) and square.mask.all() and (square.image == 200).all()


def test_bank_keeps_at_most_per_class_instances():
    images, _ = _labeled()
    many = torch.zeros(1, 16, 16, dtype=torch.long)
    for k in range(4):
        many[0, 4 * k: 4 * k + 2, 0:2] = 2  # four separate class-2 objects
    bank = InstanceBank(images[:1], many, 4, per_class=2, generator=torch.Generator().manual_seed(0), min_pixels=4)
    assert len(bank.by_class[2]) == 2


def test_pasted_pixels_carry_the_instances_class_in_image_and_labels_together():
    images, masks = _labeled()
    bank = InstanceBank(images, masks, 4, 5, torch.Generator().manual_seed(0), exclude=frozenset({0}), min_pixels=4)
    targets = torch.zeros(3, 3, 16, 16, dtype=torch.uint8)
    maps = torch.stack([torch.ones(3, 16, 16, dtype=torch.long), torch.full((3, 16, 16), 7)], 1)
    out_images, out_maps = bank.paste(targets, maps, count=1, probability=1.0,
                                      generator=torch.Generator().manual_seed(1), pasted_value=(255,))
    for image, label_map in zip(out_images, out_maps):
        pasted = label_map[0] != 1
        assert pasted.any()
        for cls, value in ((2, 200), (3, 100)):
            where = label_map[0] == cls
            assert (image[:, where] == value).all()
        assert (label_map[1][pasted] == 255).all() and (label_map[1][~pasted] == 7).all()
        assert (image[:, ~pasted] == 0).all()
    assert torch.equal(maps[:, 0], torch.ones(3, 16, 16, dtype=torch.long))  # inputs untouched


def test_probability_zero_pastes_nothing():
    images, masks = _labeled()
    bank = InstanceBank(images, masks, 4, 5, torch.Generator().manual_seed(0), exclude=frozenset({0}), min_pixels=4)
    maps = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    out_images, out_maps = bank.paste(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), maps, 2, 0.0,
                                      torch.Generator().manual_seed(0), ())
    assert not out_images.any() and not out_maps.any()
