"""The study's self-training ablation: which student switches each of its rows sets.

The rows follow the order Simple Baseline's recipe adds its pieces. Each row sets every
switch, so a row means the same whatever params.yaml's student defaults are; `study.ablation_rows`
in params.yaml names rows of this table.
"""

from __future__ import annotations

OFF = {"strong_augment": False, "dsbn": False, "pseudo_loss": "ce", "copy_paste_probability": 0.0,
        "dense_contrast_weight": 0.0}
_STEPS = [("plain-ce", "student, plain CE", {}),
          ("strong-aug", "+ strong augmentation", {"strong_augment": True}),
          ("dsbn", "+ DSBN", {"dsbn": True}),
          ("self-correction", "+ self-correction loss", {"pseudo_loss": "self_correction"}),
          ("copy-paste", "+ copy-paste", {"copy_paste_probability": 0.5}),
          ("dense-contrast", "+ dense contrast", {"dense_contrast_weight": 0.1})]


def _cumulative() -> dict[str, tuple[str, dict]]:
    """Each row: every switch off, plus what this step and all steps before it turned on."""
    rows, switches = {}, dict(OFF)
    for key, label, added in _STEPS:
        switches = {**switches, **added}
        rows[key] = (label, switches)
    return rows


PIECES = _STEPS[1:]  # (key, label, the switches it turns on): what the student adds to plain CE
# row -> (its label in the report, the student switches it sets). After the cumulative rows,
# the last one without strong augmentation: the piece on which the tuning splits tried so far
# and val disagree most (README, "The student recipe"), so its worth on val is measured with
# the rounds too.
_CUMULATIVE = _cumulative()
ABLATION = {**_CUMULATIVE, "no-strong-aug": ("+ dense contrast, no strong augmentation",
                                             {**_CUMULATIVE["dense-contrast"][1], "strong_augment": False})}
ROUNDS_ROW = "dense-contrast"  # the row that also gets later rounds (study.rounds) and longer students
CHAIN_ROWS = (ROUNDS_ROW, "no-strong-aug")  # the rows that get later rounds


def student_overrides(switches: dict) -> list[str]:
    """`student.<switch>=<value>` for each switch, as Hydra and `--set` take them."""
    return [f"student.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in switches.items()]
