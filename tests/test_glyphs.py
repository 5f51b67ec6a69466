import numpy as np

from pipeline.data import digit_scenes, glyphs, shape_scenes


def test_the_encoders_labeled_source_shares_no_class_with_a_built_in_task():
    letters = set(glyphs.LETTERS)
    assert not letters & set(shape_scenes.CLASSES) and not letters & set(digit_scenes.CLASSES)
    assert len(letters) == len(glyphs.LETTERS) == 24


def test_every_letter_draws_in_every_font():
    """A font that lacks a letter (or a matplotlib without the font) would make blank examples."""
    from PIL import Image, ImageDraw

    for path in glyphs.font_files():
        for letter in glyphs.LETTERS:
            canvas = Image.new("L", (64, 64), 0)
            ImageDraw.Draw(canvas).text((32, 32), letter, font=glyphs._font(path, 40), fill=255, anchor="mm")
            assert canvas.getbbox() is not None, (path.name, letter)


def test_letters_are_deterministic_and_each_is_drawn():
    first = list(glyphs.generate(0, 32, 24))
    again = list(glyphs.generate(0, 32, 24))
    assert all(a[2] == b[2] and np.array_equal(a[1], b[1]) for a, b in zip(first, again))
    assert all(image.shape == (32, 32, 3) and 0 <= label < 24 for _, image, label in first)


def test_letters_are_written_as_image_level_labeled_shards(tmp_path):
    from pipeline.data.png import decode_png
    from pipeline.data.shards import CLASSIFY_SCHEMA, read_split

    assert glyphs.write_letters(tmp_path, 0, 32, 30, shard_rows=16) == 30
    table = read_split(tmp_path)
    assert table.schema.equals(CLASSIFY_SCHEMA) and len(list(tmp_path.glob("*.parquet"))) == 2
    expected = list(glyphs.generate(0, 32, 30))
    assert table.column("label").to_pylist() == [label for _, _, label in expected]
    assert np.array_equal(decode_png(table.column("image")[7].as_py()), expected[7][1])
