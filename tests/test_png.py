import numpy as np

from pipeline.data.png import decode_png, encode_png


def test_png_round_trip_is_lossless():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    mask = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    assert np.array_equal(decode_png(encode_png(image)), image)
    assert np.array_equal(decode_png(encode_png(mask)), mask)
