"""The time–quality curve: each budget is the default composition with its steps and rounds,
and the chosen point and the README's table come from the figures file."""

import json
from pathlib import Path

import pytest

from pipeline.compose import compose
from pipeline.config.params import load_params
from pipeline.tools.budget_curve import (
    BUDGETS,
    CURVE_JSON,
    DEFAULT_ROUNDS,
    README_BEGIN,
    README_END,
    STUDENT_EPOCHS,
    TEACHER_EPOCHS,
    Budget,
    chosen,
    markdown,
    write_readme,
)

ROOT = Path(__file__).resolve().parent.parent


def test_each_budget_composes_the_default_with_its_steps_and_rounds():
    for budget in BUDGETS:
        params = compose(["data.tuning=true", *budget.overrides()])
        assert params.teacher.epochs * params.teacher.steps_per_epoch == budget.teacher_steps
        assert params.student.epochs * params.student.steps_per_epoch == budget.student_steps
        assert list(params.self_training.rounds.items()) == [("round1", "teacher"), ("round2", "round1")][:budget.rounds]
        assert params.data.tuning and params.student.dense_contrast_weight == 0.1  # the default's recipe, kept
    assert Budget(1500, 500, 2).name == "teacher 1500, student 500 × 2 rounds"
    default = compose([])  # what the budgets keep and cut
    assert (default.teacher.epochs, default.student.epochs, len(default.self_training.rounds)) == (
        TEACHER_EPOCHS, STUDENT_EPOCHS, DEFAULT_ROUNDS)
    with pytest.raises(ValueError, match="rounds: expected 1 to 2"):
        Budget(1500, 500, 3)
    with pytest.raises(ValueError, match="must split into 15 teacher and 10 student epochs"):
        Budget(1000, 500, 1)


def _curve(*points: tuple[float, float]) -> dict:
    return {"date": "2026-12-06", "commit": "0123456789abcdef", "machine": "2 CPUs (test)",
            "points": [{"name": f"budget {i}", "pipeline_s": s, "teacher_miou": 0.4, "student_miou": m}
                       for i, (s, m) in enumerate(points)]}


def test_the_chosen_budget_is_the_fastest_within_the_tolerance_of_the_best_student():
    curve = _curve((760.0, 0.595), (510.0, 0.588), (400.0, 0.570), (330.0, 0.560))
    assert chosen(curve["points"])["name"] == "budget 1"
    assert chosen(_curve((760.0, 0.595), (510.0, 0.580))["points"])["name"] == "budget 0"
    table = markdown(curve)
    assert "| budget 1 | 510 | 0.400 | 0.588 | **chosen** |" in table
    assert table.index("budget 3") < table.index("budget 0")  # fastest first
    assert "commit `0123456789` on 2 CPUs (test)" in table


def test_the_readme_block_is_replaced_from_the_figures(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold\n{README_END}\nafter\n")
    write_readme(_curve((500.0, 0.5)), readme)
    text = readme.read_text()
    assert "old" not in text and "| budget 0 | 500 | 0.400 | 0.500 | **chosen** |" in text and text.endswith("after\n")


def test_the_pipelines_budget_is_the_one_the_curve_chose():
    """The committed params.yaml against the committed curve (reports/budget_curve.json,
    measured on the tuning split, never on val): the default's steps and rounds are its
    chosen point's."""
    pick = chosen(json.loads((ROOT / CURVE_JSON).read_text())["points"])
    params = load_params(ROOT / "params.yaml")
    assert (params.teacher.epochs * params.teacher.steps_per_epoch, params.student.epochs * params.student.steps_per_epoch,
            len(params.self_training.rounds)) == (pick["teacher_steps"], pick["student_steps"], pick["rounds"])
