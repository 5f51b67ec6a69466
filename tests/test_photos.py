from pathlib import Path

import numpy as np

from pipeline.data.photos import TRAIN_PHOTOS, VAL_PHOTOS, load_photos, sklearn_photo


def test_scikit_learns_photos_are_read_as_its_own_loader_reads_them():
    """Read from the package's folder (scikit-learn's import costs seconds of every `prepare`),
    the pixels are the ones `load_sample_images` gives, so the built-in datasets do not change."""
    from sklearn.datasets import load_sample_images

    samples = load_sample_images()
    for path, image in zip(samples.filenames, samples.images):
        assert np.array_equal(sklearn_photo(Path(path).name), image)


def test_every_background_photo_loads_as_rgb():
    for photo in load_photos(TRAIN_PHOTOS + VAL_PHOTOS):
        assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3 and photo.flags.c_contiguous
