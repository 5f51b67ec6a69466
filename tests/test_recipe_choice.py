"""The student recipe's forward selection: which pieces it keeps, the composition each trial
runs, and the README's table and params.yaml's student from the committed choice."""

import json
import shutil
from pathlib import Path

import pytest

from pipeline.compose import compose
from pipeline.config.ablation import OFF, PIECES
from pipeline.config.params import ConfigError, load_params
from pipeline.tools.recipe_choice import (
    CHOICE_JSON,
    PLAIN,
    README_BEGIN,
    README_END,
    chosen_switches,
    forward_selection,
    markdown,
    overrides,
    write_readme,
)

ROOT = Path(__file__).resolve().parent.parent
LABELS = [label for _, label, _ in PIECES]


def _scorer(gains: dict[str, float]):
    """A student whose score is 0.5 plus the gain of each switch that differs from OFF, recording
    what it was asked."""
    asked = []
    gain_of = {next(iter(added.items())): gains.get(label, 0.0) for _, label, added in PIECES}

    def score(switches: dict, rounds: int) -> dict:
        asked.append((switches, rounds))
        on = [(k, v) for k, v in switches.items() if v != OFF[k]]
        return {"teacher_miou": 0.4, "student_miou": 0.5 + sum(gain_of[s] for s in on) + 0.01 * (rounds - 1)}

    return score, asked


def test_a_piece_is_kept_only_if_it_beats_the_best_score_so_far():
    score, asked = _scorer({"+ strong augmentation": 0.06, "+ DSBN": -0.02, "+ self-correction loss": 0.0,
                            "+ copy-paste": 0.01, "+ dense contrast": 0.02})
    trials = forward_selection(score, rounds=2)
    assert [t["tried"] for t in trials] == [PLAIN, *LABELS, "the kept recipe, 2 rounds"]
    assert [t["kept"] for t in trials[1:-1]] == [True, False, False, True, True]  # a tie is not kept
    # Each piece is tried on top of the pieces kept before it, never of one dropped.
    assert trials[3]["on_top_of"] == ["+ strong augmentation"] and not trials[3]["switches"]["dsbn"]
    assert trials[3]["switches"]["pseudo_loss"] == "self_correction"
    assert trials[-1]["on_top_of"] == ["+ strong augmentation", "+ copy-paste", "+ dense contrast"]
    assert chosen_switches({"trials": trials}) == {**OFF, "strong_augment": True, "copy_paste_probability": 0.5,
                                                   "dense_contrast_weight": 0.1}
    assert [r for _, r in asked] == [1] * 6 + [2]
    assert trials[-1]["student_miou"] == pytest.approx(0.5 + 0.06 + 0.01 + 0.02 + 0.01)


def test_with_no_piece_better_the_plain_student_is_kept():
    trials = forward_selection(_scorer({label: -0.01 for label in LABELS})[0], rounds=1)
    assert not any(t["kept"] for t in trials[1:-1]) and trials[-1]["switches"] == OFF
    assert "Kept, the pipeline's student recipe: plain CE + none." in markdown(_choice(trials))


def test_a_trial_composes_the_tuning_split_with_its_switches_and_rounds():
    default = compose([])
    switches = {**OFF, "strong_augment": True, "pseudo_loss": "self_correction"}
    params = compose(overrides(switches, 1, default))
    assert params.data.tuning and list(params.self_training.rounds) == ["round1"]
    assert params.student.strong_augment and params.student.pseudo_loss == "self_correction"
    assert not params.student.dsbn and params.student.copy_paste_probability == 0.0
    # The students train the study's ablation length, whatever the pipeline's (the budget curve's choice).
    assert (params.student.epochs, params.student.steps_per_epoch) == (default.study.ablation_student_epochs,
                                                                       default.study.student_steps_per_epoch)
    assert list(compose(overrides(OFF, 2, default)).self_training.rounds) == list(default.self_training.rounds)
    with pytest.raises(ConfigError, match=r"rounds: expected 1 to 2 \(the default's\), got 3"):
        overrides(OFF, 3, default)


def test_a_trial_runs_the_pipeline_on_its_own_composition_and_reads_its_metrics(tmp_path, monkeypatch):
    """`measure_all` with the worktree and the timed `pipeline.run` replaced: each trial's
    params.yaml is the tuning split's default with its recipe, and its figures its metrics'."""
    from pipeline.run import dvc_paths
    from pipeline.tools import bench
    from pipeline.tools.recipe_choice import measure_all

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    metrics = tmp_path / dvc_paths(tmp_path)["metrics"]
    metrics.parent.mkdir(parents=True)
    seen = []

    def pipeline_run(command, env, cwd):
        params = load_params(cwd / "params.yaml")
        seen.append(params)
        student = 0.5 + 0.05 * params.student.strong_augment + 0.01 * (len(params.self_training.rounds) - 1)
        metrics.write_text(json.dumps({"teacher": {"miou": 0.45}, "student": {"miou": student}}))
        return 300.0

    monkeypatch.setattr(bench, "in_worktree", lambda commit, env, run: run(tmp_path, env))
    monkeypatch.setattr(bench, "timed", pipeline_run)
    trials = measure_all("0" * 40, {})
    assert len(seen) == len(PIECES) + 2 and all(p.data.tuning for p in seen)
    assert [len(p.self_training.rounds) for p in seen] == [1] * (len(PIECES) + 1) + [2]
    assert [t["kept"] for t in trials[1:-1]] == [True, False, False, False, False]
    assert trials[-1] | {"switches": None} == {"tried": "the kept recipe, 2 rounds", "on_top_of": ["+ strong augmentation"],
                                               "switches": None, "rounds": 2, "pipeline_s": 300.0,
                                               "teacher_miou": 0.45, "student_miou": pytest.approx(0.56), "kept": True}


def _choice(trials: list[dict]) -> dict:
    return {"date": "2026-12-07", "commit": "0123456789abcdef", "machine": "2 CPUs (test)", "trials": trials}


def test_the_table_and_the_readme_block_come_from_the_trials(tmp_path):
    score, _ = _scorer({"+ strong augmentation": 0.06, "+ DSBN": -0.02})
    choice = _choice(forward_selection(score, rounds=2))
    table = markdown(choice)
    assert "commit `0123456789` on 2 CPUs (test)" in table and "teacher 0.400" in table
    assert "| + strong augmentation | plain CE | 1 | 0.560 | +0.0600 | yes |" in table
    assert "| + DSBN | strong augmentation | 1 | 0.540 | -0.0200 | no |" in table
    assert "| + self-correction loss | strong augmentation | 1 | 0.560 | +0.0000 | no |" in table  # against 0.56, not 0.54
    assert "| the kept recipe, 2 rounds | strong augmentation | 2 | 0.570 |  | yes |" in table
    assert "Kept, the pipeline's student recipe: plain CE + strong augmentation." in table
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold\n{README_END}\nafter\n")
    write_readme(choice, readme)
    assert "old" not in readme.read_text() and table in readme.read_text()


def test_the_pipelines_student_is_the_recipe_the_selection_kept():
    """The committed params.yaml against the committed choice (reports/recipe_choice.json,
    measured on the tuning split, never on val)."""
    student = load_params(ROOT / "params.yaml").student
    assert {k: getattr(student, k) for k in OFF} == chosen_switches(json.loads((ROOT / CHOICE_JSON).read_text()))


def test_the_study_measures_the_kept_recipe_on_val_with_its_rounds():
    """The recipe the selection kept is an ablation row that gets the pipeline's rounds in the
    study, so its val score (3 seeds) stands in the report beside the rows it was chosen over."""
    from pipeline.config.ablation import ABLATION, CHAIN_ROWS

    kept = chosen_switches(json.loads((ROOT / CHOICE_JSON).read_text()))
    assert any(ABLATION[row][1] == kept for row in CHAIN_ROWS), \
        f"no ablation row with rounds has the kept recipe {kept}: add one (pipeline/config/ablation.py)"
