"""One generated block of the README rewritten, the rest of the file kept byte for byte."""

import re

import pytest

from pipeline.config.params import ConfigError
from pipeline.tools.readme_block import replace_block, write_block

BEGIN, END = "<!-- t:begin -->", "<!-- t:end -->"


@pytest.mark.parametrize("content", ["| new |", "| new |\n", "\n| new |\n\n"])
def test_the_block_holds_the_content_between_one_line_break_each_side(tmp_path, content):
    readme = tmp_path / "README.md"
    readme.write_text(f"# T\n\nbefore\n{BEGIN}\nold\nlines\n{END}\nafter {END}\n")
    write_block(readme, BEGIN, END, content)
    assert readme.read_text() == f"# T\n\nbefore\n{BEGIN}\n| new |\n{END}\nafter {END}\n"


@pytest.mark.parametrize("text", ["no markers", f"only {BEGIN}", f"only {END}"])
def test_a_missing_marker_names_the_file_and_both_markers(tmp_path, text):
    with pytest.raises(ConfigError, match=f"^{re.escape(str(tmp_path / 'README.md'))}: no {BEGIN} … {END} markers"):
        replace_block(text, BEGIN, END, "x", tmp_path / "README.md")
