import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from pipeline.config.ablation import ABLATION, ROUNDS_ROW
from pipeline.config.params import ConfigError, StudentConfig, StudyConfig
from pipeline.tools.study import (
    PHASES,
    README_BEGIN,
    README_END,
    DvcState,
    Point,
    ablation_rows,
    ablation_table,
    chosen_recipe,
    collect,
    dataset_plans,
    figure2,
    figure2_shares,
    findings,
    longer_student,
    markdown,
    measured_points,
    paired_difference,
    pipeline_row,
    plan,
    planned_points,
    report,
    result_files,
    sigma_sweep,
    update_readme,
    write_outputs,
)

ROOT = Path(__file__).resolve().parent.parent


def test_default_plan_covers_figure2_and_the_sweep_once_each_on_the_data_and_its_control():
    cfg = StudyConfig()
    study = plan(cfg)
    # Figure 2: 4 initialisations x 5 fractions x 3 seeds; sweep: 2 modes x 4 σ x 3 seeds at 5%,
    # of which DDeP σ=0.2 and DeP σ=0.4 at 5% are already Figure 2 points.
    # Pretraining length: 1 longer DDeP pretraining x 1 fraction x 3 seeds. The control: the same, 2 seeds.
    # The recipe choice: one DDeP pretraining and teacher, at the ablation's 5%, 1 tuning seed.
    per_seed = (60 + 24 - 6 + 3) // 3
    assert len(study["teachers"]) == per_seed * 3 + per_seed * 2 + 1
    assert len(study["pretrain"]) == (2 + 4 + 4) * 2 + 1
    assert len(study["subsets"]) == 5 * 3 + 5 * 2 + 1
    for key in [*study["teachers"], *study["pretrain"], *study["subsets"]]:
        assert "." not in key and "@" not in key, key  # DVC stage-name safe
    sweep = {k: t for k, t in study["teachers"].items()
             if t["fraction"] == cfg.sweep_fraction and t["pretrain"] in study["pretrain"]}
    assert {study["pretrain"][t["pretrain"]]["sigma"] for t in sweep.values()
            if study["pretrain"][t["pretrain"]]["mode"] == "ddep"} == set(cfg.sigmas)
    assert study["pretrain"]["ddep-s0p2"] == {"encoder": "models/encoder.pt", "init": "supervised", "mode": "ddep",
                                              "sigma": 0.2, "prepared": "data/prepared"}
    assert study["pretrain"]["dep-s0p4"]["init"] == "random"
    # The control's points: its own prepared data, keys and files, the same encoders, after all the pipeline's.
    assert study["datasets"] == {"tuning": {"out": "study/data/prepared-tuning", "prepare_args": "--set data.tuning=true",
                                            "role": "recipe choice"},
                                 "digits": {"out": "study/data/prepared-digits", "prepare_args": "--set data.format=digits",
                                            "role": "control"}}
    digits = study["teachers"]["digits-ddep-s0p2-f5-seed1"]
    assert digits["subset"] == "digits-f5-seed1" and digits["pretrain"] == "digits-ddep-s0p2"
    assert digits["prepared"] == study["pretrain"]["digits-ddep-s0p2"]["prepared"] == "study/data/prepared-digits"
    assert study["pretrain"]["digits-ddep-s0p2"]["encoder"] == "models/encoder.pt"
    assert "digits-ddep-s0p2-f5-seed2" not in study["teachers"]
    student = study["students"]["digits-plain-ce-f5-seed0-r1"]
    assert student["pretrained"] == "study/models/pretrained-digits-ddep-s0p2.pt"
    assert study["pseudo"]["digits-r1-f5-seed0"]["teacher"] == "study/models/teacher-digits-ddep-s0p2-f5-seed0.pt"
    order = [stage for stage, _ in result_files(study)]
    assert max(i for i, s in enumerate(order) if "digits-" not in s) < min(i for i, s in enumerate(order) if "digits-" in s)
    # The recipe choice right after the pipeline data's ablation, before the rest of its points.
    tuning = [i for i, s in enumerate(order) if "tuning-" in s]
    # teacher; pseudo-labels of round 1, of round 2 by each chain's students (the ablation's last
    # row, its longer students, the chosen recipe); 9 students, 2 longer ones
    assert tuning == list(range(tuning[0], tuning[0] + 1 + 4 + 11))
    assert order[tuning[0] - 1] == "student@no-strong-aug-f5-seed2-r2" and order[tuning[0]] == "teacher@tuning-ddep-s0p2-f5-seed0"
    parts = dataset_plans(study)
    assert set(parts) == {None, "tuning", "digits"} and parts["digits"]["prefix"] == "digits-"
    assert [part["role"] for part in parts.values()] == ["pipeline", "recipe choice", "control"]
    assert len(parts[None]["teachers"]) == per_seed * 3 and len(parts["digits"]["students"]) == 2 * 11
    assert list(parts["tuning"]["pretrain"]) == ["tuning-ddep-s0p2"] and len(parts["tuning"]["students"]) == 11


def test_teachers_train_their_fractions_steps_and_the_main_questions_first():
    cfg = StudyConfig(control=None, tuning_seeds=[], fractions=[0.01, 0.1, 1.0], sweep_fraction=0.1, teacher_steps=[6, 10, 40], teacher_epochs=2,
                      ablation_fractions=[0.1], pretrain_fractions=[0.1])
    study = plan(cfg)
    teachers = study["teachers"]
    assert {(t["fraction"], t["epochs"] * t["steps_per_epoch"]) for t in teachers.values()} == {
        (0.01, 6), (0.1, 10), (1.0, 40)}
    assert all(t["epochs"] == 2 for t in teachers.values())
    order = [stage for stage, _ in result_files(study)]
    first = [stage for stage in order if stage.startswith("teacher@")][:8]
    # Figure 2 at the sweep fraction, seed after seed, then DDeP with every label, then the ablation.
    assert first == [f"teacher@{init}-f10-seed{seed}" for seed in (0, 1)
                     for init in ("random", "supervised", "dep-s0p4", "ddep-s0p2")]
    assert order.index("teacher@ddep-s0p2-f100-seed1") < order.index("pseudo@r1-f10-seed0")
    assert order.index("student@dense-contrast-f10-seed1-r2") < order.index("teacher@random-f100-seed0")
    assert order.index("pseudo@r2-f10-seed0") > order.index("student@dense-contrast-f10-seed1-r1")
    assert order.index("teacher@random-f100-seed1") < order.index("teacher@random-f1-seed0")
    assert order[-1].startswith("teacher@ddep-s0p2-e")  # the longer pretraining's teachers after its curve
    assert order.index("pretrain_length@ddep-s0p2-e30") < order.index(order[-1])
    assert teachers["ddep-s0p2-f10-seed0"]["phase"] == PHASES["figure2 at the sweep fraction"]  # not the sweep's


def test_ablation_adds_one_piece_per_row_and_a_second_round_from_the_round_one_student():
    cfg = StudyConfig(control=None, tuning_seeds=[])
    study = plan(cfg)
    subsets = len(cfg.ablation_fractions) * len(cfg.seeds)
    # round 1, round 2 by each chain (the last cumulative row's, its longer students', the chosen
    # recipe's); each row, the two chains' second rounds and two longer students
    assert len(study["pseudo"]) == 4 * subsets and len(study["students"]) == (len(ABLATION) + 2 + 2) * subsets
    recipe = study["students"]["no-strong-aug-f5-seed1-r2"]
    assert recipe["pseudo"] == "r2-no-strong-aug-f5-seed1" and "strong_augment=false" in recipe["overrides"]
    assert study["pseudo"]["r2-no-strong-aug-f5-seed1"]["teacher"] == "study/models/student-no-strong-aug-f5-seed1-r1.pt"
    plain, full = study["students"]["plain-ce-f5-seed1-r1"], study["students"]["self-correction-f5-seed1-r1"]
    assert plain["teacher"] == "study/models/teacher-ddep-s0p2-f5-seed1.pt" and plain["pseudo"] == "r1-f5-seed1"
    assert "--set student.strong_augment=false" in plain["overrides"] and "pseudo_loss=ce" in plain["overrides"]
    assert "strong_augment=true" in full["overrides"] and "dsbn=true" in full["overrides"]
    assert "pseudo_loss=self_correction" in full["overrides"]
    second = study["students"][f"{ROUNDS_ROW}-f5-seed1-r2"]
    assert study["pseudo"][second["pseudo"]]["teacher"] == f"study/models/student-{ROUNDS_ROW}-f5-seed1-r1.pt"
    for key in [*study["pseudo"], *study["students"]]:
        assert "." not in key and "@" not in key, key
    for row, (_, values) in ABLATION.items():  # every row sets every switch, whatever params.yaml says
        assert set(values) == set(ABLATION["plain-ce"][1]), row


def test_more_rounds_chain_each_rounds_student_to_the_one_before_and_get_rows_of_their_own(tmp_path):
    cfg = StudyConfig(control=None, tuning_seeds=[], seeds=[0], rounds=3)
    study = plan(cfg)
    third = study["students"][f"{ROUNDS_ROW}-f5-seed0-r3"]
    assert third["pseudo"] == "r3-f5-seed0" and third["teacher"] == f"study/models/student-{ROUNDS_ROW}-f5-seed0-r2.pt"
    assert study["pseudo"]["r3-f5-seed0"]["teacher"] == third["teacher"]
    order = [stage for stage, _ in result_files(study)]
    assert (order.index(f"student@{ROUNDS_ROW}-f5-seed0-r2") < order.index("pseudo@r3-f5-seed0")
            < order.index(f"student@{ROUNDS_ROW}-f5-seed0-r3"))
    for key in study["students"]:
        (tmp_path / f"student-{key}.json").write_text(json.dumps({"miou": 0.5}))
    rows = list(ablation_rows(study, tmp_path, cfg))
    assert rows.index("+ dense contrast, 2 rounds") + 1 == rows.index("+ dense contrast, 3 rounds")
    assert "pseudo-labels, round 3" in rows
    one = plan(StudyConfig(control=None, tuning_seeds=[], seeds=[0], rounds=1))
    assert set(one["pseudo"]) == {"r1-f5-seed0"}
    for rounds in (0, 2.5, True):
        with pytest.raises(ConfigError, match="study.rounds: expected a whole number of self-training rounds"):
            StudyConfig(control=None, tuning_seeds=[], rounds=rounds)


def test_longer_students_chain_their_own_rounds_from_the_teachers_labels_and_are_reported_not_chosen(tmp_path):
    cfg = StudyConfig(control=None, tuning_seeds=[], seeds=[0, 1], student_epochs=[30])
    study = plan(cfg)
    first, second = (study["students"][f"{ROUNDS_ROW}-e30-f5-seed1-r{r}"] for r in (1, 2))
    assert first["pseudo"] == "r1-f5-seed1" and first["teacher"] == "study/models/teacher-ddep-s0p2-f5-seed1.pt"
    assert second["pseudo"] == "r2-e30-f5-seed1" and second["steps"] == 1500
    assert study["pseudo"]["r2-e30-f5-seed1"]["teacher"] == f"study/models/student-{ROUNDS_ROW}-e30-f5-seed1-r1.pt"
    assert "--set student.epochs=30 --set student.steps_per_epoch=50" in second["overrides"]
    # The ablation's own length on every other student's command, whatever params.yaml's student trains.
    assert "--set student.epochs=10 --set student.steps_per_epoch=50" in study["students"][f"{ROUNDS_ROW}-f5-seed1-r2"]["overrides"]
    assert all("--set student.epochs=" in st["overrides"] for st in study["students"].values())
    for key in study["students"]:
        (tmp_path / f"student-{key}.json").write_text(json.dumps({"miou": 0.6 if "e30" in key else 0.5}))
    for key in study["teachers"]:
        (tmp_path / f"{key}.json").write_text(json.dumps({"miou": 0.8 if "f100" in key else 0.4}))
    rows = ablation_rows(study, tmp_path, cfg)
    assert [row for row in rows if longer_student(row)] == ["+ dense contrast, 1500 steps",
                                                              "+ dense contrast, 1500 steps, 2 rounds"]
    assert "pseudo-labels, round 2 (1500-step students)" in rows
    assert chosen_recipe(rows, cfg) == "student, plain CE"  # all alike at 0.5: the first; 0.6 is not a choice
    said = findings(collect(study, tmp_path), rows, cfg, "+ dense contrast, 2 rounds")
    assert any(line.startswith("**A longer student** (dense contrast, 1500 steps) at 5% labels reaches 75% ± 0%")
               for line in said), said
    with pytest.raises(ConfigError, match="study.student_epochs: expected positive whole numbers, got 0"):
        StudyConfig(control=None, tuning_seeds=[], student_epochs=[0])
    with pytest.raises(ConfigError, match="study.ablation_student_epochs: expected positive whole numbers, got 2.5"):
        StudyConfig(control=None, tuning_seeds=[], ablation_student_epochs=2.5)


def test_ablation_rows_pick_the_students_and_the_second_round_needs_its_row():
    picked = plan(StudyConfig(control=None, tuning_seeds=[], seeds=[0], ablation_rows=[ROUNDS_ROW, "plain-ce"]))
    assert sorted(picked["students"]) == sorted(["plain-ce-f5-seed0-r1", f"{ROUNDS_ROW}-f5-seed0-r1",
                                                 f"{ROUNDS_ROW}-f5-seed0-r2", f"{ROUNDS_ROW}-e30-f5-seed0-r1",
                                                 f"{ROUNDS_ROW}-e30-f5-seed0-r2"])
    one = plan(StudyConfig(control=None, tuning_seeds=[], seeds=[0], ablation_rows=["dsbn"]))
    assert list(one["students"]) == ["dsbn-f5-seed0-r1"] and list(one["pseudo"]) == ["r1-f5-seed0"]
    for rows in (["dsbn", "mixup"], []):
        with pytest.raises(ConfigError, match="study.ablation_rows: expected null or a non-empty list of plain-ce"):
            StudyConfig(control=None, tuning_seeds=[], ablation_rows=rows)  # before any plan is made


def test_ablation_table_averages_seeds_and_adds_teacher_full_supervision_and_pseudo_label_rows(tmp_path):
    cfg = StudyConfig(control=None, tuning_seeds=[], fractions=[0.1, 1.0], seeds=[0, 1], sigmas=[0.2], dep_sigma=0.2, sweep_fraction=0.1,
                      teacher_steps=[10, 20], ablation_fractions=[0.1], pretrain_fractions=[])
    study = plan(cfg)
    for key in study["teachers"]:
        (tmp_path / f"{key}.json").write_text(json.dumps({"miou": 0.9 if "f100" in key else 0.3}))
    for key, p in study["pseudo"].items():
        (tmp_path / f"pseudo-{key}.json").write_text(json.dumps({"miou": 0.2 + 0.1 * p["round"]}))
    for key, st in study["students"].items():
        (tmp_path / f"student-{key}.json").write_text(json.dumps({"miou": 0.4 + 0.01 * st["seed"]}))
    rows = ablation_rows(study, tmp_path, cfg)
    table = ablation_table(rows, cfg)
    assert next(iter(table)) == "teacher (DDeP)" and table["teacher (DDeP)"][0.1][:2] == (0.3, 0.0)
    assert table["fully supervised (100% labels)"][0.1][0] == 0.9
    mean, std, n = table["+ self-correction loss"][0.1]
    assert n == 2 and mean == pytest.approx(0.405) and std == pytest.approx(0.005)
    assert table["pseudo-labels, round 2"][0.1][0] == pytest.approx(0.4)
    assert "+ dense contrast, 2 rounds" in table
    shares = ablation_table(rows, cfg, share=True)  # each seed's student over that seed's 0.9
    assert shares["+ DSBN"][0.1][0] == pytest.approx(0.405 / 0.9)
    assert "fully supervised (100% labels)" not in shares and "pseudo-labels, round 1" not in shares
    text = markdown(figure2(collect(study, tmp_path), cfg), sigma_sweep(collect(study, tmp_path), cfg), cfg, table,
                    ablation_shares=shares)
    assert "| + DSBN | 0.405 ± 0.005 | 45% ± 1% |" in text
    assert "| pseudo-labels, round 1 | 0.300 ± 0.000 |  |" in text
    (tmp_path / f"student-{next(iter(study['students']))}.json").unlink()
    assert ablation_table(ablation_rows(study, tmp_path, cfg), cfg)["student, plain CE"][0.1][2] == 1  # the other seed's
    without_full = StudyConfig(**{**cfg.__dict__, "fractions": [0.1], "teacher_steps": [10]})
    rows = ablation_rows(plan(without_full), tmp_path, without_full)
    assert "fully supervised (100% labels)" not in ablation_table(rows, without_full)
    assert ablation_table(rows, without_full, share=True) == {}


def test_ablation_table_is_empty_until_a_student_is_trained(tmp_path):
    cfg = StudyConfig(control=None, tuning_seeds=[], fractions=[0.1, 1.0], seeds=[0, 1], sigmas=[0.2], dep_sigma=0.2, sweep_fraction=0.1,
                      teacher_steps=[10, 20], ablation_fractions=[0.1], pretrain_fractions=[])
    study = plan(cfg)
    for key in study["teachers"]:
        (tmp_path / f"{key}.json").write_text(json.dumps({"miou": 0.3}))
    assert ablation_rows(study, tmp_path, cfg) == {} and ablation_table({}, cfg) == {}
    points = collect(study, tmp_path)
    text = markdown(figure2(points, cfg), sigma_sweep(points, cfg), cfg, {})
    assert "(not trained yet)" in text.split("Self-training ablation")[1]


def test_committed_plan_is_the_plan_of_the_committed_params():
    from pipeline.config.params import load_params

    committed = yaml.safe_load((ROOT / "study" / "plan.yaml").read_text())
    params = load_params(ROOT / "params.yaml")
    assert committed == plan(params.study, params.decoder_pretrain)


def test_longer_pretrainings_get_their_own_teachers_and_the_default_length_only_its_loss_curve():
    from pipeline.config.params import DecoderPretrainConfig

    cfg = StudyConfig(control=None, tuning_seeds=[], seeds=[0, 1], pretrain_epochs=[30, 60], pretrain_fractions=[0.01])
    study = plan(cfg, DecoderPretrainConfig(epochs=6, steps_per_epoch=50))
    lengths = study["pretrain_length"]
    assert [(p["epochs"], p["steps"], p["default"]) for p in lengths.values()] == [(6, 300, True), (30, 1500, False),
                                                                                 (60, 3000, False)]
    assert all({k: p[k] for k in ("encoder", "mode", "sigma")} == {"encoder": "models/encoder.pt", "mode": "ddep",
                                                                    "sigma": 0.2} for p in lengths.values())
    by_pretrain = {}
    for key, t in study["teachers"].items():
        by_pretrain.setdefault(t["pretrain"], []).append((t["fraction"], t["seed"]))
    assert "ddep-s0p2-e6" not in by_pretrain  # Figure 2's DDeP teachers are that length's
    assert by_pretrain["ddep-s0p2-e30"] == by_pretrain["ddep-s0p2-e60"] == [(0.01, 0), (0.01, 1)]
    # The pipeline's own length is one of the longer ones: then it has no teachers of its own.
    assert "ddep-s0p2-e30" not in {t["pretrain"] for t in plan(cfg, DecoderPretrainConfig(epochs=30))["teachers"].values()}


def test_pretrain_length_table_reads_each_lengths_loss_and_keeps_its_teachers_out_of_figure2(tmp_path):
    from pipeline.config.params import DecoderPretrainConfig
    from pipeline.tools.study import pretrain_length_table

    cfg = StudyConfig(control=None, tuning_seeds=[], fractions=[0.05, 1.0], sigmas=[0.2], dep_sigma=0.2, sweep_fraction=0.05, teacher_steps=[10, 10],
                      ablation_fractions=[], pretrain_epochs=[30], pretrain_fractions=[0.05])
    study = plan(cfg, DecoderPretrainConfig(epochs=6))
    mious = {"supervised-f5": 0.3, "ddep-s0p2-f5": 0.2, "ddep-s0p2-e30-f5": 0.4}
    for key in study["teachers"]:
        stem = key.rsplit("-seed", 1)[0]
        if stem in mious:
            (tmp_path / f"{key}.json").write_text(json.dumps({"miou": mious[stem]}))
    (tmp_path / "pretrain-ddep-s0p2-e30.csv").write_text("epoch,loss,lr\n1,0.9,0.1\n2,0.5,0.01\n")
    points = collect(study, tmp_path)
    table = pretrain_length_table(points, study, tmp_path, cfg)
    assert list(table) == ["supervised encoder, no decoder pretraining", "DDeP, 300 steps (Figure 2's)",
                           "DDeP, 1500 steps"]
    assert table["DDeP, 1500 steps"]["loss"] == 0.5 and table["DDeP, 1500 steps"][0.05][:1] == (pytest.approx(0.4),)
    assert table["DDeP, 300 steps (Figure 2's)"]["loss"] is None  # its curve not written yet
    assert table["DDeP, 300 steps (Figure 2's)"][0.05][0] == pytest.approx(0.2)
    assert table["supervised encoder, no decoder pretraining"][0.05][0] == pytest.approx(0.3)
    assert figure2(points, cfg)["DDeP"][0.05][0] == pytest.approx(0.2)  # the longer pretraining is not Figure 2's
    text = markdown(figure2(points, cfg), sigma_sweep(points, cfg), cfg, {}, table)
    assert "| DDeP, 1500 steps | 0.500 | 0.400 ± 0.000 |" in text
    assert "| DDeP, 300 steps (Figure 2's) | – | 0.200 ± 0.000 |" in text
    assert "| supervised encoder, no decoder pretraining | n/a | 0.300 ± 0.000 |" in text


def _points(cfg: StudyConfig) -> list[Point]:
    """Made-up mIoUs with a known mean and spread: 0.1 + fraction/10 (+/- 0.01 by seed)."""
    study = plan(cfg)
    points = []
    for teacher in study["teachers"].values():
        pre = study["pretrain"][teacher["pretrain"]]
        offset = {"random": 0.0, "supervised": 0.1}[pre["init"]] + {"none": 0.0, "dep": 0.01, "ddep": 0.02}[pre["mode"]]
        points.append(Point(pre["mode"], pre["init"], pre["sigma"], teacher["fraction"], teacher["seed"],
                            0.1 + offset + teacher["fraction"] / 10 + (0.01 if teacher["seed"] else -0.01)))
    return points


def test_tables_average_over_seeds_and_keep_the_spread():
    cfg = StudyConfig(control=None, tuning_seeds=[], fractions=[0.1, 1.0], seeds=[0, 1], sigmas=[0.2, 0.4], sweep_fraction=0.1, teacher_steps=[10, 20],
                      ablation_fractions=[0.1], pretrain_fractions=[])
    points = _points(cfg)
    fig2 = figure2(points, cfg)
    mean, std, n = fig2["DDeP"][1.0]
    assert n == 2 and mean == pytest.approx(0.1 + 0.12 + 0.1) and std == pytest.approx(0.01)
    assert fig2["random init"][0.1][0] == pytest.approx(0.11)
    sweep = sigma_sweep(points, cfg)
    assert set(sweep) == {"DDeP", "DeP"} and set(sweep["DeP"]) == {0.2, 0.4}
    assert sweep["DeP"][0.2][2] == 2
    assert "| DDeP | 0.230 ± 0.010 | 0.320 ± 0.010 |" in markdown(fig2, sweep, cfg)


def test_collect_reads_each_teachers_metrics_and_a_partial_study_reports_what_it_has(tmp_path):
    cfg = StudyConfig(control=None, tuning_seeds=[], fractions=[0.5, 1.0], seeds=[0, 1], sigmas=[0.2], dep_sigma=0.2, sweep_fraction=1.0,
                      teacher_steps=[10, 10], ablation_fractions=[], pretrain_fractions=[])
    study = plan(cfg)
    for i, key in enumerate(study["teachers"]):
        (tmp_path / f"{key}.json").write_text(json.dumps({"miou": i / 100}))
    points = collect(study, tmp_path)
    assert len(points) == len(study["teachers"]) == 16
    assert measured_points(study, tmp_path) == planned_points(study) == 16
    full = report(study, tmp_path, cfg, StudentConfig(), 1, tmp_path / "report", "shapes", "c0ffee")
    assert (full.measured, full.planned) == (16, 16)
    full = full.text
    assert full.startswith("Commit `c0ffee`.") and "–" not in full.split("boundary F1")[0]
    # The 100% column not trained at all and one seed of DDeP at 50%: "–" and "(1 of 2 seeds)".
    for key, teacher in study["teachers"].items():
        if teacher["fraction"] == 1.0 or (key.startswith("ddep") and teacher["seed"] == 1):
            (tmp_path / f"{key}.json").unlink()
    points = collect(study, tmp_path)
    fig2 = figure2(points, cfg)
    assert len(points) == 7 and fig2["DDeP"][1.0][2] == 0 and fig2["DDeP"][0.5][2] == 1
    partial = report(study, tmp_path, cfg, StudentConfig(), 1, tmp_path / "report", "shapes", "c0ffee")
    assert (partial.measured, partial.planned) == (7, 16)
    text = partial.text
    assert text.startswith("**Partial: 7 of 16 points measured so far**")
    ddep_row = next(line for line in text.splitlines() if line.startswith("| DDeP |"))
    assert ddep_row.endswith("(1 of 2 seeds) | – |")
    write_outputs(fig2, sigma_sweep(points, cfg), tmp_path)
    last = (tmp_path / "figure2.csv").read_text().splitlines()[-1].split(",")
    assert last[0] == "1" and last[1:] == [""] * 8  # not trained: empty, not "nan" or 0


def test_outputs_are_csvs_for_dvc_plots_and_figures(tmp_path):
    cfg = StudyConfig(control=None, tuning_seeds=[], fractions=[0.1, 1.0], seeds=[0, 1], sigmas=[0.2, 0.4], sweep_fraction=0.1, teacher_steps=[10, 20],
                      ablation_fractions=[0.1], pretrain_fractions=[])
    points = _points(cfg)
    write_outputs(figure2(points, cfg), sigma_sweep(points, cfg), tmp_path)
    header, *rows = (tmp_path / "figure2.csv").read_text().splitlines()
    assert header.split(",")[:3] == ["fraction", "random init mean", "random init std"]
    assert len(rows) == 2
    assert (tmp_path / "figure2.png").stat().st_size > 1000 and (tmp_path / "sigma_sweep.png").is_file()


def test_readme_table_is_replaced_between_the_markers(tmp_path):
    readme, report = tmp_path / "README.md", tmp_path / "report.md"
    readme.write_text(f"# T\n{README_BEGIN}\nold\n{README_END}\nafter\n")
    with pytest.raises(ConfigError, match="report.md: missing"):
        update_readme(report, readme)
    report.write_text("| new |\n")
    update_readme(report, readme)
    assert readme.read_text() == f"# T\n{README_BEGIN}\n| new |\n{README_END}\nafter\n"
    readme.write_text("no markers")
    with pytest.raises(ConfigError, match="markers"):
        update_readme(report, readme)


def test_a_recorded_point_is_skipped_without_its_models_and_rerun_when_anything_it_depends_on_changes(
        tmp_path, monkeypatch):
    """A fresh clone has the study's lock and metrics but no models: finished points count as
    done, as they do when an input the study made was made again (pseudo-labels on another
    CPU); a changed command or params, a changed input from outside, or a point never run does not."""
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["dvc", "init", "-q"], check=True, env=env)
    (tmp_path / "study" / "data").mkdir(parents=True)
    (tmp_path / "params.yaml").write_text("teacher:\n  lr: 0.1\n")
    (tmp_path / "data.txt").write_text("images\n")
    made = tmp_path / "study" / "data" / "pseudo.txt"
    made.write_text("labels\n")
    stage = {"wdir": "..", "cmd": "cp data.txt model.bin && cp data.txt m.json",
             "deps": ["data.txt", "study/data/pseudo.txt"], "params": ["teacher"], "outs": ["model.bin"], "metrics": [{"m.json": {"cache": False}}]}
    dvc_file = Path("study/dvc.yaml")
    never = {**stage, "cmd": "cp data.txt other.bin", "outs": ["other.bin"], "metrics": []}
    dvc_file.write_text(yaml.safe_dump({"stages": {"done": stage, "never": never}}))
    subprocess.run(["dvc", "repro", "-q", f"{dvc_file}:done"], check=True, env=env)
    shutil.rmtree(tmp_path / ".dvc" / "cache")

    def recorded(name: str) -> bool:  # the runner reads DVC's state once, at its start
        return DvcState.read(dvc_file, env).recorded(f"{dvc_file}:{name}")

    (tmp_path / "model.bin").unlink()
    assert recorded("done")
    assert not recorded("never")
    made.write_text("labels, a few pixels apart\n")
    assert recorded("done")

    (tmp_path / "params.yaml").write_text("teacher:\n  lr: 0.2\n")
    assert not recorded("done")
    (tmp_path / "params.yaml").write_text("teacher:\n  lr: 0.1\n")
    (tmp_path / "data.txt").write_text("other images\n")
    assert not recorded("done")
    (tmp_path / "data.txt").write_text("images\n")
    assert recorded("done")
    dvc_file.write_text(dvc_file.read_text().replace("cp data.txt", "cp -p data.txt", 1))
    assert not recorded("done")


def test_per_class_table_averages_figure2_teachers_at_the_sweep_fraction_by_class(tmp_path):
    from pipeline.config.params import DecoderPretrainConfig
    from pipeline.tools.study import per_class_table

    cfg = StudyConfig(control=None, tuning_seeds=[], fractions=[0.05, 1.0], seeds=[0, 1], sigmas=[0.2], dep_sigma=0.2, sweep_fraction=0.05, teacher_steps=[10, 10],
                      ablation_fractions=[], pretrain_epochs=[30], pretrain_fractions=[0.05])
    study = plan(cfg, DecoderPretrainConfig(epochs=6))
    for key, teacher in study["teachers"].items():
        digit = 0.2 + 0.1 * teacher["seed"] + (0.5 if "e30" in key else 0.0) + (0.01 if teacher["fraction"] == 1.0 else 0)
        (tmp_path / f"{key}.json").write_text(json.dumps({"miou": 0.5, "per_class_iou": {"background": 0.9,
                                                                                         "digit": digit}}))
    (tmp_path / "ddep-s0p2-f5-seed1.json").unlink()  # one seed of DDeP so far
    for seed in (0, 1):  # DeP not trained yet; random init never saw or predicted a digit
        (tmp_path / f"dep-s0p2-f5-seed{seed}.json").unlink()
        (tmp_path / f"random-f5-seed{seed}.json").write_text(json.dumps({"miou": 0.9,
                                                                          "per_class_iou": {"background": 0.9}}))
    table = per_class_table(collect(study, tmp_path), cfg)
    assert list(table) == ["random init", "supervised encoder", "DeP", "DDeP"]
    mean, std, n = table["supervised encoder"]["digit"]
    assert (mean, std, n) == (pytest.approx(0.25), pytest.approx(0.05), 2)  # 5% only: not 100%, not the 30-epoch DDeP
    assert table["DDeP"]["digit"] == (pytest.approx(0.2), 0.0, 1)
    text = markdown(figure2([], cfg), sigma_sweep([], cfg), cfg, {}, None, table)
    assert "| class | random init | supervised encoder | DeP | DDeP |" in text
    assert "| digit | n/a | 0.250 ± 0.050 | – | 0.200 (1 of 2 seeds) |" in text
    assert "| background | 0.900 ± 0.000 | 0.900 ± 0.000 | – | 0.900 (1 of 2 seeds) |" in text


def test_shares_and_differences_pair_each_seed_with_itself_and_the_findings_say_what_the_tables_show(tmp_path):
    from pipeline.config.params import StudentConfig

    cfg = StudyConfig(control=None, tuning_seeds=[], fractions=[0.05, 1.0], seeds=[0, 1], sigmas=[0.2], dep_sigma=0.2, sweep_fraction=0.05,
                      teacher_steps=[10, 20], ablation_fractions=[0.05], pretrain_fractions=[])
    study = plan(cfg)
    full = {0: 0.6, 1: 0.8}  # seed 1's subset is the easier one: shares pair seeds, not means
    for key, t in study["teachers"].items():
        pre = study["pretrain"][t["pretrain"]]
        low = {"supervised": 0.3, "ddep": 0.36, "random": 0.1, "dep": 0.12}[pre["mode"] if pre["mode"] != "none"
                                                                           else pre["init"]]
        miou = full[t["seed"]] if t["fraction"] == 1.0 else low * full[t["seed"]] / 0.6
        (tmp_path / f"{key}.json").write_text(json.dumps({"miou": miou, "boundary_f1": miou / 2}))
    for key, st in study["students"].items():
        (tmp_path / f"student-{key}.json").write_text(json.dumps({"miou": 0.54 * full[st["seed"]] / 0.6}))
    points = collect(study, tmp_path)
    shares = figure2_shares(points, cfg)
    assert shares["supervised encoder"][0.05][:2] == (pytest.approx(0.5), pytest.approx(0.0))
    assert 1.0 not in shares["DDeP"]
    gap = paired_difference(points, cfg, "DDeP", "supervised encoder")[0.05]
    assert gap[0] == pytest.approx(0.07) and gap[2] == 2
    assert figure2(points, cfg, "boundary_f1")["DDeP"][1.0][0] == pytest.approx(0.35)
    assert pipeline_row(StudentConfig(), 1, cfg) == "+ self-correction loss"
    assert pipeline_row(StudentConfig(dsbn=False, strong_augment=True, pseudo_loss="self_correction"), 1, cfg) is None
    assert pipeline_row(StudentConfig(), 2, cfg) is None  # only the second-round row has a second round
    dense = StudentConfig(**ABLATION[ROUNDS_ROW][1])
    assert pipeline_row(dense, 2, cfg) == "+ dense contrast, 2 rounds" and pipeline_row(dense, 1, cfg) == "+ dense contrast"
    # A student of another length: the longer chain's row where the study has one, else none.
    longer = replace(dense, epochs=10, steps_per_epoch=150)
    assert pipeline_row(longer, 2, replace(cfg, student_epochs=[30])) == "+ dense contrast, 1500 steps, 2 rounds"
    assert pipeline_row(longer, 2, replace(cfg, student_epochs=[20])) is None
    assert pipeline_row(replace(StudentConfig(), steps_per_epoch=150), 1, replace(cfg, student_epochs=[30])) is None
    said = findings(points, ablation_rows(study, tmp_path, cfg), cfg, "+ self-correction loss")
    assert said[0].startswith("**Headroom**") and "50% ± 0%" in said[0]
    assert "5% labels +0.070 ± 0.010, ahead by more than the seeds' spread" in said[1]
    assert "reaches 90% ± 0% of the fully supervised DDeP teacher" in said[2]
    assert "minus its teacher's, seed by seed, is +0.210 ± 0.030: ahead by more than the seeds' spread" in said[2]
    text = markdown(figure2(points, cfg), sigma_sweep(points, cfg), cfg, findings=said, shares=shares,
                    boundary=figure2(points, cfg, "boundary_f1"))
    assert text.startswith("- **Headroom**") and "| supervised encoder | 50% ± 0% |" in text
    assert "| DDeP | 0.210 ± 0.030 | 0.350 ± 0.050 |" in text.split("boundary F1")[1]


def test_the_report_has_a_section_per_dataset_each_from_its_own_points_and_seeds(tmp_path):
    from pipeline.config.params import StudentConfig
    from pipeline.tools.study import dataset_report

    cfg = StudyConfig(fractions=[0.05, 1.0], seeds=[0, 1, 2], control_seeds=[0, 1], sigmas=[0.2], dep_sigma=0.2,
                      sweep_fraction=0.05, teacher_steps=[10, 20], ablation_fractions=[0.05], pretrain_fractions=[])
    study = plan(cfg)
    for key in study["teachers"]:
        (tmp_path / f"{key}.json").write_text(json.dumps({"miou": 0.2 if key.startswith("digits-") else 0.4}))
    out = tmp_path / "report"
    parts = dataset_plans(study)
    shapes = dataset_report(parts[None], None, tmp_path, cfg, StudentConfig(), 1, out, "shapes")
    digits = dataset_report(parts["digits"], "digits", tmp_path, cfg, StudentConfig(), 1, out, "shapes")
    assert shapes.startswith("### Shape scenes (the pipeline's own data, `data.format: shapes`), 3 seeds")
    assert digits.startswith("### Digit scenes (the control, `study.control: digits`), 2 seeds")
    assert "| DDeP | 0.400 ± 0.000 | 0.400 ± 0.000 |" in shapes and "| DDeP | 0.200 ± 0.000 | 0.200 ± 0.000 |" in digits
    assert "| DDeP | 100% ± 0% |" in digits  # each a share of its own dataset's 100%
    assert {f.name for f in out.iterdir()} >= {"figure2.csv", "figure2-digits.csv", "sigma_sweep-digits.png"}


def test_the_committed_study_dvc_yaml_resolves_every_point_of_the_default_plan(tmp_path):
    """DVC's own reading of study/dvc.yaml with the default plan: one stage per plan entry, the
    control's and the tuning split's data prepared by their own stages and read by their points (the one-seed end-to-end study
    runs without a control)."""
    shutil.copytree(ROOT / "study", tmp_path / "study", ignore=shutil.ignore_patterns("store", "data", "models",
                                                                                     "metrics", "report", "figures"))
    (tmp_path / "study" / "dvc.lock").unlink(missing_ok=True)
    study = plan(StudyConfig())
    (tmp_path / "study" / "plan.yaml").write_text(yaml.safe_dump(study))
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc = Path(sys.executable).parent / "dvc"
    subprocess.run([str(dvc), "init", "-q"], cwd=tmp_path, check=True)
    listed = subprocess.run([str(dvc), "stage", "list", "study/dvc.yaml", "--name-only"], cwd=tmp_path, check=True,
                            capture_output=True, text=True).stdout.split()
    for section, stage in (("pretrain", "pretrain"), ("teachers", "teacher"), ("students", "student"),
                           ("pseudo", "pseudo"), ("subsets", "subset"), ("datasets", "prepare")):
        assert {name.split("@", 1)[1] for name in listed if name.startswith(f"study/dvc.yaml:{stage}@")} == set(study[section])
    dag = subprocess.run([str(dvc), "dag", "--dot", "study/dvc.yaml:student@digits-plain-ce-f5-seed0-r1"], cwd=tmp_path,
                         check=True, capture_output=True, text=True).stdout
    assert "prepare@digits" in dag and "teacher@digits-ddep-s0p2-f5-seed0" in dag
    dag = subprocess.run([str(dvc), "dag", "--dot", "study/dvc.yaml:student@tuning-strong-aug-f5-seed0-r1"], cwd=tmp_path,
                         check=True, capture_output=True, text=True).stdout
    assert "prepare@tuning" in dag and "pretrain@tuning-ddep-s0p2" in dag and "digits" not in dag
    # The second round: pseudo-labels from the first round's student, then a student on them.
    edges = set(re.findall(r'"([^"]+)" -> "([^"]+)"', subprocess.run(
        [str(dvc), "dag", "--dot", "study/dvc.yaml:student@dense-contrast-f5-seed0-r2"], cwd=tmp_path, check=True,
        capture_output=True, text=True).stdout))
    assert {("study/dvc.yaml:student@dense-contrast-f5-seed0-r1", "study/dvc.yaml:pseudo@r2-f5-seed0"),
            ("study/dvc.yaml:pseudo@r2-f5-seed0", "study/dvc.yaml:student@dense-contrast-f5-seed0-r2")} <= edges


def test_missing_inputs_are_made_again_one_stage_at_a_time_and_nothing_recorded_below_them(tmp_path, monkeypatch):
    """subset -> pseudo -> student, run once, then two new points: `point` from the student,
    `other` (another ablation row) from the pseudo-labels. On another machine the subset and
    the pseudo-labels are not there, and the pseudo-labels come out other when made again."""
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["dvc", "init", "-q"], check=True, env=env)
    (tmp_path / "data.txt").write_text("images\n")

    def stage(name: str, dep: str, out: str) -> dict:
        # Each run appends its name to runs.log; the pseudo stage writes something new each time.
        extra = f" && date +%N >> {out}" if name == "pseudo" else ""
        return {"wdir": "..", "cmd": f"cp {dep} {out} && echo {name} >> runs.log{extra}", "deps": [dep], "outs": [out]}

    dvc_file = Path("study/dvc.yaml")
    for folder in ("study/data", "study/models"):
        (tmp_path / folder).mkdir(parents=True)
    dvc_file.write_text(yaml.safe_dump({"stages": {
        "subset": stage("subset", "data.txt", "study/data/subset.txt"),
        "pseudo": stage("pseudo", "study/data/subset.txt", "study/data/pseudo.txt"),
        "student": stage("student", "study/data/pseudo.txt", "study/models/student.txt"),
        "point": stage("point", "study/models/student.txt", "point.txt"),
        "other": stage("other", "study/data/pseudo.txt", "other.txt")}}))
    subprocess.run(["dvc", "repro", "-q", f"{dvc_file}:student"], check=True, env=env)
    shutil.rmtree(tmp_path / ".dvc" / "cache")  # another machine: no cache, no run cache
    (tmp_path / "study/data/pseudo.txt").unlink()
    (tmp_path / "study/data/subset.txt").unlink()

    def runs_for(point: str) -> list[str]:
        """Run the point's missing inputs as the runner does, from one reading of DVC's state."""
        (tmp_path / "runs.log").write_text("")
        state = DvcState.read(dvc_file, env)
        for stage in state.missing_inputs(f"{dvc_file}:{point}"):
            subprocess.run(["dvc", "repro", "-q", "--single-item", stage], check=True, env=env)
            state.made(stage)
        return (tmp_path / "runs.log").read_text().split()

    assert runs_for("point") == []  # the student is here: what it was made from is not needed
    assert runs_for("other") == ["subset", "pseudo"]  # upstream first, the point itself not yet
    assert DvcState.read(dvc_file, env).recorded(f"{dvc_file}:student")  # its input made again, a few bits apart: still done
    assert runs_for("other") == []
    (tmp_path / "study/models/student.txt").unlink()
    assert runs_for("point") == ["student"]  # a model the store lost: made again from its inputs


def test_the_recipe_choice_reads_the_tuning_splits_students_only_and_names_the_best_row(tmp_path):
    from pipeline.tools.study import recipe_report

    cfg = StudyConfig(fractions=[0.05, 1.0], seeds=[0, 1], control=None, tuning_seeds=[0], sigmas=[0.2], dep_sigma=0.2,
                      sweep_fraction=0.05, teacher_steps=[10, 20], ablation_fractions=[0.05], pretrain_fractions=[])
    tuning = dataset_plans(plan(cfg))["tuning"]
    assert {st["seed"] for st in tuning["students"].values()} == {0}
    scores = {"plain-ce": 0.40, "strong-aug": 0.50, "dsbn": 0.45, "self-correction": 0.44, "copy-paste": 0.43,
              "dense-contrast": 0.47, "no-strong-aug": 0.46}
    for key, st in tuning["students"].items():
        (tmp_path / f"student-{key}.json").write_text(json.dumps({"miou": scores[st["row"]] + 0.01 * (st["round"] - 1)}))
        (tmp_path / f"student-{key.removeprefix('tuning-')}.json").write_text(json.dumps({"miou": 0.9}))  # val: unread
    rows = ablation_rows(tuning, tmp_path, replace(cfg, seeds=cfg.tuning_seeds))
    assert chosen_recipe(rows, replace(cfg, seeds=cfg.tuning_seeds)) == "+ strong augmentation"
    text = recipe_report(tuning, tmp_path, cfg, StudentConfig(**ABLATION["strong-aug"][1]), 1)
    assert "| + strong augmentation | 0.500 ± 0.000 |" in text and "| + dense contrast, 2 rounds | 0.480 ± 0.000 |" in text
    assert "**Chosen: strong augmentation**; the pipeline's student (params.yaml) is the same." in text
    assert "is not the same: params.yaml's is + self-correction loss" in recipe_report(tuning, tmp_path, cfg, StudentConfig(), 1)
    assert "|  | 5% labels |\n|---|---|\n" in text  # no val columns unless asked for
    val_plan = dataset_plans(plan(cfg))[None]
    for key, st in val_plan["students"].items():  # on val, DSBN first
        (tmp_path / f"student-{key}.json").write_text(json.dumps({"miou": 0.6 if st["row"] == "dsbn" else 0.5}))
    beside = recipe_report(tuning, tmp_path, cfg, StudentConfig(**ABLATION["strong-aug"][1]), 1, val_plan)
    assert "| + strong augmentation | 0.500 ± 0.000 | 0.500 ± 0.000 |" in beside
    assert "| + DSBN | 0.450 ± 0.000 | 0.600 ± 0.000 |" in beside
    assert "**Chosen: strong augmentation**" in beside and "On val the best of the same rows is DSBN." in beside
    (tmp_path / "student-tuning-dsbn-f5-seed0-r1.json").unlink()  # a row not trained yet: nothing chosen
    assert "Chosen" not in recipe_report(tuning, tmp_path, cfg, StudentConfig(), 1)


def test_the_runner_says_before_each_point_how_many_are_recorded_and_the_time_left_at_its_pace():
    from pipeline.tools.study import Progress

    progress = Progress(planned=194, to_train=133, started=1000.0)
    assert progress.line("teacher@random-f1-seed0", now=1000.0) == (
        "study: teacher@random-f1-seed0 (61 of 194 points recorded; 133 to train)")
    progress.point_done()
    progress.point_done()
    assert progress.line("teacher@dep-s0p4-f1-seed0", now=1000.0 + 2 * 150) == (
        "study: teacher@dep-s0p4-f1-seed0 (63 of 194 points recorded; 131 to train, about 5 h 27 min at this run's pace)")


def test_the_report_gives_a_dataset_its_section_by_its_role_in_the_plan_not_by_its_name(tmp_path):
    from pipeline.tools.study import report

    cfg = StudyConfig(fractions=[0.05, 1.0], seeds=[0], control=None, tuning_seeds=[0], sigmas=[0.2], dep_sigma=0.2,
                      sweep_fraction=0.05, teacher_steps=[10, 20], ablation_fractions=[0.05], pretrain_fractions=[])
    study = plan(cfg)
    study["datasets"] = {"held-out": study["datasets"]["tuning"]}  # the recipe choice's data under another name
    text = report(study, tmp_path, cfg, StudentConfig(), 1, tmp_path / "report", "shapes", "0123456").text
    assert "### Recipe choice (the tuning split" in text and "### held-out" not in text
    study["datasets"]["held-out"]["role"] = "control"
    text = report(study, tmp_path, cfg, StudentConfig(), 1, tmp_path / "report", "shapes", "0123456").text
    assert "### Recipe choice" not in text and "### held-out (the control, `study.control: held-out`)" in text
    assert (tmp_path / "report" / "figure2-held-out.csv").is_file()
