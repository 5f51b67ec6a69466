import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config.params import ConfigError, StudyConfig
from pipeline.tools.study import (
    ABLATION,
    README_BEGIN,
    README_END,
    SECOND_ROUND,
    Point,
    ablation_table,
    collect,
    figure2,
    markdown,
    measured_points,
    plan,
    planned_points,
    recorded,
    sigma_sweep,
    update_readme,
    write_outputs,
)

ROOT = Path(__file__).resolve().parent.parent


def test_default_plan_covers_figure2_and_the_sweep_once_each():
    cfg = StudyConfig()
    study = plan(cfg)
    # Figure 2: 4 initialisations x 5 fractions x 2 seeds; sweep: 2 modes x 5 σ x 2 seeds at 5%,
    # of which DDeP σ=0.2 and DeP σ=0.4 at 5% are already Figure 2 points.
    # Pretraining length: 2 longer DDeP pretrainings x 2 fractions x 2 seeds.
    assert len(study["teachers"]) == 40 + 20 - 4 + 8
    assert len(study["pretrain"]) == 2 + 5 + 5
    assert len(study["subsets"]) == 5 * 2
    for key in [*study["teachers"], *study["pretrain"], *study["subsets"]]:
        assert "." not in key and "@" not in key, key  # DVC stage-name safe
    sweep = {k: t for k, t in study["teachers"].items()
             if t["fraction"] == cfg.sweep_fraction and t["pretrain"] in study["pretrain"]}
    assert {study["pretrain"][t["pretrain"]]["sigma"] for t in sweep.values()
            if study["pretrain"][t["pretrain"]]["mode"] == "ddep"} == set(cfg.sigmas)
    assert study["pretrain"]["ddep-s0p2"] == {"encoder": "models/encoder.pt", "init": "supervised", "mode": "ddep",
                                              "sigma": 0.2}
    assert study["pretrain"]["dep-s0p4"]["init"] == "random"


def test_teachers_train_their_fractions_steps_cheapest_first():
    cfg = StudyConfig(fractions=[0.1, 1.0], sweep_fraction=0.1, teacher_steps=[10, 40], teacher_epochs=2,
                      ablation_fractions=[0.1], pretrain_fractions=[])
    teachers = list(plan(cfg)["teachers"].values())
    assert [t["fraction"] for t in teachers] == sorted(t["fraction"] for t in teachers)
    assert {(t["fraction"], t["epochs"] * t["steps_per_epoch"]) for t in teachers} == {(0.1, 10), (1.0, 40)}
    assert all(t["epochs"] == 2 for t in teachers)


def test_ablation_adds_one_piece_per_row_and_a_second_round_from_the_round_one_student():
    cfg = StudyConfig()
    study = plan(cfg)
    subsets = len(cfg.ablation_fractions) * len(cfg.seeds)
    assert len(study["pseudo"]) == 2 * subsets and len(study["students"]) == (len(ABLATION) + 1) * subsets
    plain, full = study["students"]["plain-ce-f5-seed1-r1"], study["students"]["self-correction-f5-seed1-r1"]
    assert plain["teacher"] == "study/models/teacher-ddep-s0p2-f5-seed1.pt" and plain["pseudo"] == "r1-f5-seed1"
    assert "--set student.strong_augment=false" in plain["overrides"] and "pseudo_loss=ce" in plain["overrides"]
    assert "strong_augment=true" in full["overrides"] and "dsbn=true" in full["overrides"]
    assert "pseudo_loss=self_correction" in full["overrides"]
    second = study["students"][f"{SECOND_ROUND}-f5-seed1-r2"]
    assert study["pseudo"][second["pseudo"]]["teacher"] == f"study/models/student-{SECOND_ROUND}-f5-seed1-r1.pt"
    for key in [*study["pseudo"], *study["students"]]:
        assert "." not in key and "@" not in key, key
    for row, (_, values) in ABLATION.items():  # every row sets every switch, whatever params.yaml says
        assert set(values) == set(ABLATION["plain-ce"][1]), row


def test_ablation_table_averages_seeds_and_adds_teacher_full_supervision_and_pseudo_label_rows(tmp_path):
    cfg = StudyConfig(fractions=[0.1, 1.0], seeds=[0, 1], sigmas=[0.2], dep_sigma=0.2, sweep_fraction=0.1,
                      teacher_steps=[10, 20], ablation_fractions=[0.1], pretrain_fractions=[])
    study = plan(cfg)
    for key in study["teachers"]:
        (tmp_path / f"{key}.json").write_text(json.dumps({"miou": 0.9 if "f100" in key else 0.3}))
    for key, p in study["pseudo"].items():
        (tmp_path / f"pseudo-{key}.json").write_text(json.dumps({"miou": 0.2 + 0.1 * p["round"]}))
    for key, st in study["students"].items():
        (tmp_path / f"student-{key}.json").write_text(json.dumps({"miou": 0.4 + 0.01 * st["seed"]}))
    table = ablation_table(study, tmp_path, cfg)
    assert next(iter(table)) == "teacher (DDeP)" and table["teacher (DDeP)"][0.1][:2] == (0.3, 0.0)
    assert table["fully supervised (100% labels)"][0.1][0] == 0.9
    mean, std, n = table["+ self-correction loss"][0.1]
    assert n == 2 and mean == pytest.approx(0.405) and std == pytest.approx(0.005)
    assert table["pseudo-labels, round 2"][0.1][0] == pytest.approx(0.4)
    assert "+ dense contrast, 2 rounds" in table
    text = markdown(figure2(collect(study, tmp_path), cfg), sigma_sweep(collect(study, tmp_path), cfg), cfg, "c0ffee",
                    table)
    assert "| + DSBN | 0.405 ± 0.005 |" in text
    (tmp_path / f"student-{next(iter(study['students']))}.json").unlink()
    assert ablation_table(study, tmp_path, cfg)["student, plain CE"][0.1][2] == 1  # the other seed's so far
    without_full = StudyConfig(**{**cfg.__dict__, "fractions": [0.1], "teacher_steps": [10]})
    assert "fully supervised (100% labels)" not in ablation_table(plan(without_full), tmp_path, without_full)


def test_ablation_table_is_empty_until_a_student_is_trained(tmp_path):
    cfg = StudyConfig(fractions=[0.1, 1.0], seeds=[0, 1], sigmas=[0.2], dep_sigma=0.2, sweep_fraction=0.1,
                      teacher_steps=[10, 20], ablation_fractions=[0.1], pretrain_fractions=[])
    study = plan(cfg)
    for key in study["teachers"]:
        (tmp_path / f"{key}.json").write_text(json.dumps({"miou": 0.3}))
    assert ablation_table(study, tmp_path, cfg) == {}
    points = collect(study, tmp_path)
    text = markdown(figure2(points, cfg), sigma_sweep(points, cfg), cfg, "c0ffee", {})
    assert "(not trained yet)" in text.split("Self-training ablation")[1]


def test_committed_plan_is_the_plan_of_the_committed_params():
    from pipeline.config.params import load_params

    committed = yaml.safe_load((ROOT / "study" / "plan.yaml").read_text())
    params = load_params(ROOT / "params.yaml")
    assert committed == plan(params.study, params.decoder_pretrain)


def test_longer_pretrainings_get_their_own_teachers_and_the_default_length_only_its_loss_curve():
    from pipeline.config.params import DecoderPretrainConfig

    cfg = StudyConfig(pretrain_epochs=[30, 60], pretrain_fractions=[0.01])
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

    cfg = StudyConfig(fractions=[0.05, 1.0], sigmas=[0.2], dep_sigma=0.2, sweep_fraction=0.05, teacher_steps=[10, 10],
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
    text = markdown(figure2(points, cfg), sigma_sweep(points, cfg), cfg, "c0ffee", {}, None, table)
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
    cfg = StudyConfig(fractions=[0.1, 1.0], seeds=[0, 1], sigmas=[0.2, 0.4], sweep_fraction=0.1, teacher_steps=[10, 20],
                      ablation_fractions=[0.1], pretrain_fractions=[])
    points = _points(cfg)
    fig2 = figure2(points, cfg)
    mean, std, n = fig2["DDeP"][1.0]
    assert n == 2 and mean == pytest.approx(0.1 + 0.12 + 0.1) and std == pytest.approx(0.01)
    assert fig2["random init"][0.1][0] == pytest.approx(0.11)
    sweep = sigma_sweep(points, cfg)
    assert set(sweep) == {"DDeP", "DeP"} and set(sweep["DeP"]) == {0.2, 0.4}
    assert sweep["DeP"][0.2][2] == 2
    text = markdown(fig2, sweep, cfg, "abc123")
    assert "| DDeP | 0.230 ± 0.010 | 0.320 ± 0.010 |" in text and "abc123" in text


def test_collect_reads_each_teachers_metrics_and_a_partial_study_reports_what_it_has(tmp_path):
    cfg = StudyConfig(fractions=[0.5, 1.0], seeds=[0, 1], sigmas=[0.2], dep_sigma=0.2, sweep_fraction=1.0,
                      teacher_steps=[10, 10], ablation_fractions=[], pretrain_fractions=[])
    study = plan(cfg)
    for i, key in enumerate(study["teachers"]):
        (tmp_path / f"{key}.json").write_text(json.dumps({"miou": i / 100}))
    points = collect(study, tmp_path)
    assert len(points) == len(study["teachers"]) == 16
    assert measured_points(study, tmp_path) == planned_points(study) == 16
    full = markdown(figure2(points, cfg), sigma_sweep(points, cfg), cfg, "c0ffee", {}, (16, 16))
    assert "Partial" not in full and "–" not in full.split("Self-training")[0]
    # The 100% column not trained at all and one seed of DDeP at 50%: "–" and "(1 of 2 seeds)".
    for key, teacher in study["teachers"].items():
        if teacher["fraction"] == 1.0 or (key.startswith("ddep") and teacher["seed"] == 1):
            (tmp_path / f"{key}.json").unlink()
    points = collect(study, tmp_path)
    fig2 = figure2(points, cfg)
    assert len(points) == 7 and fig2["DDeP"][1.0][2] == 0 and fig2["DDeP"][0.5][2] == 1
    progress = measured_points(study, tmp_path), planned_points(study)
    text = markdown(fig2, sigma_sweep(points, cfg), cfg, "c0ffee", {}, progress)
    assert "**Partial: 7 of 16 points measured so far**" in text
    ddep_row = next(line for line in text.splitlines() if line.startswith("| DDeP |"))
    assert ddep_row.endswith("(1 of 2 seeds) | – |")
    write_outputs(fig2, sigma_sweep(points, cfg), tmp_path)
    last = (tmp_path / "figure2.csv").read_text().splitlines()[-1].split(",")
    assert last[0] == "1" and last[1:] == [""] * 8  # not trained: empty, not "nan" or 0


def test_outputs_are_csvs_for_dvc_plots_and_figures(tmp_path):
    cfg = StudyConfig(fractions=[0.1, 1.0], seeds=[0, 1], sigmas=[0.2, 0.4], sweep_fraction=0.1, teacher_steps=[10, 20],
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
    done; a changed command or params, a changed input, or a point never run does not."""
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["dvc", "init", "-q"], check=True, env=env)
    (tmp_path / "study").mkdir()
    (tmp_path / "params.yaml").write_text("teacher:\n  lr: 0.1\n")
    (tmp_path / "data.txt").write_text("images\n")
    stage = {"wdir": "..", "cmd": "cp data.txt model.bin && cp data.txt m.json",
             "deps": ["data.txt"], "params": ["teacher"], "outs": ["model.bin"], "metrics": [{"m.json": {"cache": False}}]}
    dvc_file = Path("study/dvc.yaml")
    never = {**stage, "cmd": "cp data.txt other.bin", "outs": ["other.bin"], "metrics": []}
    dvc_file.write_text(yaml.safe_dump({"stages": {"done": stage, "never": never}}))
    subprocess.run(["dvc", "repro", "-q", f"{dvc_file}:done"], check=True, env=env)
    shutil.rmtree(tmp_path / ".dvc" / "cache")
    (tmp_path / "model.bin").unlink()
    assert recorded(dvc_file, "done", env)
    assert not recorded(dvc_file, "never", env)

    (tmp_path / "params.yaml").write_text("teacher:\n  lr: 0.2\n")
    assert not recorded(dvc_file, "done", env)
    (tmp_path / "params.yaml").write_text("teacher:\n  lr: 0.1\n")
    (tmp_path / "data.txt").write_text("other images\n")
    assert not recorded(dvc_file, "done", env)
    (tmp_path / "data.txt").write_text("images\n")
    assert recorded(dvc_file, "done", env)
    dvc_file.write_text(dvc_file.read_text().replace("cp data.txt", "cp -p data.txt", 1))
    assert not recorded(dvc_file, "done", env)


def test_per_class_table_averages_figure2_teachers_at_the_sweep_fraction_by_class(tmp_path):
    from pipeline.config.params import DecoderPretrainConfig
    from pipeline.tools.study import per_class_table

    cfg = StudyConfig(fractions=[0.05, 1.0], sigmas=[0.2], dep_sigma=0.2, sweep_fraction=0.05, teacher_steps=[10, 10],
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
    text = markdown(figure2([], cfg), sigma_sweep([], cfg), cfg, "c0ffee", {}, None, None, table)
    assert "| class | random init | supervised encoder | DeP | DDeP |" in text
    assert "| digit | n/a | 0.250 ± 0.050 | – | 0.200 (1 of 2 seeds) |" in text
    assert "| background | 0.900 ± 0.000 | 0.900 ± 0.000 | – | 0.900 (1 of 2 seeds) |" in text
