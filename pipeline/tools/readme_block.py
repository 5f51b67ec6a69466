"""Generated tables in the README: each lives between a pair of HTML comment markers, and a
tool that measures something rewrites only its own block, keeping the hand-written rest."""

from __future__ import annotations

from pathlib import Path

from pipeline.config.params import ConfigError
from pipeline.data.atomic import write_text_atomic


def replace_block(text: str, begin: str, end: str, content: str, readme: Path) -> str:
    """`text` with what lies between `begin` and `end` replaced by `content` (one line break
    on each side); `readme` names the file in the error when a marker is missing."""
    if begin not in text or end not in text:
        raise ConfigError(f"{readme}: no {begin} … {end} markers to put the table between")
    head, rest = text.split(begin, 1)
    return f"{head}{begin}\n{content.strip(chr(10))}\n{end}{rest.split(end, 1)[1]}"


def write_block(readme: Path, begin: str, end: str, content: str) -> None:
    write_text_atomic(readme, replace_block(readme.read_text(), begin, end, content, readme))
