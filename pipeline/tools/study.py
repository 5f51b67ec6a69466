"""The label-efficiency study: the DDeP paper's Figure 2 and σ sweep, run by the pipeline's own stages.

    python -m pipeline.tools.study            # write study/plan.yaml, `dvc repro` each point of it
    python -m pipeline.tools.study plan       # only write the plan (what `dvc repro` will run)
    python -m pipeline.tools.study readme     # copy study/report/report.md into README.md

A study stopped part-way (Ctrl-C; it resumes where it stopped) reports what it has measured
so far with `dvc repro --single-item study/dvc.yaml:report`: the tables say how many points
are in and mark the rest "–".

`study/dvc.yaml` runs `encoder_init`, `decoder_pretrain`, `labeled_subset` and
`teacher_finetune` once per entry of the plan (DVC `foreach`), each with `--set` overrides,
so every point is cached and only what a params edit touches runs again. The plan is a pure
function of params.yaml's `study` section; `study_report` turns the teachers' val metrics
into tables, CSVs for `dvc plots` and figures. `study/dvc.lock` and `study/metrics/` are
committed: the study goes on where it stopped, also from a fresh clone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml

from pipeline.config.ablation import ABLATION, CHAIN_ROWS, ROUNDS_ROW, student_overrides
from pipeline.config.params import (
    PARAMS_FILE,
    ConfigError,
    DecoderPretrainConfig,
    StudyConfig,
    load_params,
)
from pipeline.data.atomic import write_text_atomic
from pipeline.tools.readme_block import write_block

STUDY_DIR = Path("study")
PLAN_FILE = STUDY_DIR / "plan.yaml"
SUPERVISED_ENCODER = "models/encoder.pt"  # the main pipeline's encoder_init output
PREPARED = "data/prepared"  # the main pipeline's prepare output, which every point reads
# A DVC remote in the repository (study/store, committed) for the outputs other points are
# trained from: the prepared shards (~40 MB: another pyarrow writes other bytes, and a new
# hash would make every point stale), the encoders, the pretrainings and the models that
# pseudo-label (a few MB each).
STORE = "study-store"
RANDOM_ENCODER = "study/models/encoder-random.pt"

# Figure 2's initialisations: (encoder, decoder pretraining mode).
CURVES = {"random init": ("random", "none"), "supervised encoder": ("supervised", "none"),
          "DeP": ("random", "dep"), "DDeP": ("supervised", "ddep")}
README_BEGIN, README_END = "<!-- study:begin -->", "<!-- study:end -->"

# The order `run` trains the points in, so that a study stopped part-way (it resumes) already
# answers the main questions: Figure 2 at the sweep fraction (the pipeline's own 5%), the
# DDeP teacher with every label (what the students are a share of), the self-training
# ablation, the recipe choice on the tuning split, the other initialisations with every
# label, Figure 2's other fractions, the σ sweep, the pretraining-length check. Within a
# phase, cheapest first, seed after seed.
PHASES = {name: i for i, name in enumerate(["figure2 at the sweep fraction", "ddep with every label", "ablation",
                                            "recipe choice", "with every label", "figure2", "sigma sweep",
                                            "pretraining length"])}
# The recipe choice's data: the pipeline's, but its val split is more train scenes
# (`data.tuning`), so that choosing the pipeline's student by it never looks at val.
TUNING = "tuning"
# What a dataset is to the study, and so which section of the report it gets.
PIPELINE_DATA, RECIPE_CHOICE, CONTROL = "pipeline", "recipe choice", "control"


@dataclass(frozen=True)
class StudyDataset:
    """A dataset the study prepares itself, beside the pipeline's own: `name` starts its keys
    and folders, `prepare_args` are `prepare`'s `--set` options, `seeds` its points', `first_phase` where its
    points come in the runner's order, `role` RECIPE_CHOICE (the ablation alone) or CONTROL
    (the whole study)."""

    name: str
    prepare_args: str
    seeds: list[int]
    first_phase: int
    role: str


def _tag(value: float) -> str:
    """A number as DVC stage names allow it (no dots): 0.05 -> 0p05."""
    return f"{value:g}".replace(".", "p")


def pretrain_key(encoder: str, mode: str, sigma: float) -> str:
    return encoder if mode == "none" else f"{mode}-s{_tag(sigma)}"


def subset_key(fraction: float, seed: int) -> str:
    return f"f{_tag(fraction * 100)}-seed{seed}"


SECTIONS = ("pretrain", "pretrain_length", "subsets", "teachers", "pseudo", "students")


def plan(cfg: StudyConfig, pretraining: DecoderPretrainConfig | None = None) -> dict:
    """Every pretraining, labeled subset, teacher, pseudo-labelling and student the study needs,
    each once, on the pipeline's prepared data; then the recipe choice (the ablation alone,
    with `cfg.tuning_seeds`) on the tuning split; then the whole study again on the control
    dataset (`cfg.control`, with `cfg.control_seeds`). The datasets other than the pipeline's
    are prepared by the study itself (`datasets`: name -> folder, `prepare`'s options and role)
    and their keys start with their name. `pretraining` (params.yaml's decoder_pretrain) is the
    length every pretraining has but the longer DDeP ones of `pretrain_length`."""
    pretraining = pretraining or DecoderPretrainConfig()
    study_plan = _dataset_plan(cfg, pretraining, "", PREPARED, 0)
    study_plan["datasets"] = {}
    others = [StudyDataset(TUNING, "--set data.tuning=true", cfg.tuning_seeds, 0, RECIPE_CHOICE)] if cfg.tuning_seeds else []
    if cfg.control:
        others.append(StudyDataset(cfg.control, f"--set data.format={cfg.control}", cfg.control_seeds, len(PHASES), CONTROL))
    for dataset in others:
        prepared = f"{STUDY_DIR}/data/prepared-{dataset.name}"
        other = _dataset_plan(replace(cfg, seeds=dataset.seeds), pretraining, f"{dataset.name}-", prepared,
                              dataset.first_phase, recipe_only=dataset.role == RECIPE_CHOICE)
        for section in SECTIONS:
            study_plan[section] |= other[section]
        study_plan["datasets"][dataset.name] = {"out": prepared, "prepare_args": dataset.prepare_args, "role": dataset.role}
    return study_plan


def _dataset_plan(cfg: StudyConfig, pretraining: DecoderPretrainConfig, prefix: str, prepared: str,
                  first_phase: int, recipe_only: bool = False) -> dict:
    """The study's points on one prepared dataset: its keys start with `prefix`, its phases
    (the order `run` trains them in) with `first_phase`. `recipe_only`: only the ablation and
    the DDeP teachers it starts from, in the recipe choice's phase."""
    curve_sigma = {"dep": cfg.dep_sigma, "ddep": cfg.ddep_sigma, "none": 0.0}
    pretrain, pretrain_length, subsets, teachers = {}, {}, {}, {}

    def add_teachers(key: str, fraction: float, phase: str) -> None:
        for seed in cfg.seeds:
            subset = prefix + subset_key(fraction, seed)
            subsets[subset] = {"fraction": float(fraction), "seed": int(seed), "prepared": prepared}
            teachers.setdefault(f"{key}-{subset_key(fraction, seed)}", {  # Figure 2's when also the sweep's
                "pretrain": key, "subset": subset, "fraction": float(fraction), "seed": int(seed),
                "epochs": cfg.teacher_epochs, "steps_per_epoch": cfg.steps_for(fraction) // cfg.teacher_epochs,
                "phase": first_phase + PHASES[phase], "prepared": prepared})

    def add(encoder: str, mode: str, sigma: float, fraction: float, phase: str) -> None:
        key = prefix + pretrain_key(encoder, mode, sigma)
        pretrain[key] = {"encoder": SUPERVISED_ENCODER if encoder == "supervised" else RANDOM_ENCODER,
                         "init": encoder, "mode": mode,
                         "sigma": float(sigma if mode != "none" else cfg.ddep_sigma),  # none: σ unused
                         "prepared": prepared}
        add_teachers(key, fraction, phase)

    if recipe_only:
        for fraction in cfg.ablation_fractions:
            add("supervised", "ddep", cfg.ddep_sigma, fraction, "recipe choice")
        return {"pretrain": pretrain, "pretrain_length": {}, "subsets": subsets, "teachers": teachers,
                **ablation_plan(cfg, prefix, prepared, first_phase + PHASES["recipe choice"])}
    full = max(cfg.fractions)
    for encoder, mode in CURVES.values():
        for fraction in cfg.fractions:
            phase = ("figure2 at the sweep fraction" if fraction == cfg.sweep_fraction else "figure2" if fraction != full
                     else "ddep with every label" if mode == "ddep" else "with every label")
            add(encoder, mode, curve_sigma[mode], fraction, phase)
    for mode, encoder in (("ddep", "supervised"), ("dep", "random")):
        for sigma in cfg.sigmas:
            add(encoder, mode, sigma, cfg.sweep_fraction, "sigma sweep")
    # The pretraining-length check: Figure 2's DDeP again, only to record its denoising loss
    # curve (its teachers are Figure 2's), then longer, each with teachers of its own.
    ddep = prefix + pretrain_key("supervised", "ddep", cfg.ddep_sigma)
    lengths = sorted({pretraining.epochs, *cfg.pretrain_epochs}) if cfg.pretrain_epochs and cfg.pretrain_fractions else []
    for epochs in lengths:
        key = f"{ddep}-e{epochs}"
        pretrain_length[key] = {**pretrain[ddep], "epochs": int(epochs),
                                "steps": int(epochs * pretraining.steps_per_epoch),
                                "default": epochs == pretraining.epochs, "phase": first_phase + PHASES["pretraining length"]}
        if epochs != pretraining.epochs:
            for fraction in cfg.pretrain_fractions:
                add_teachers(key, fraction, "pretraining length")
    ordered = sorted(teachers.items(), key=lambda kv: (kv[1]["phase"], kv[1]["fraction"], kv[1]["seed"]))
    return {"pretrain": pretrain, "pretrain_length": pretrain_length, "subsets": subsets,
            "teachers": dict(ordered), **ablation_plan(cfg, prefix, prepared, first_phase + PHASES["ablation"])}


def _overrides(values: dict) -> str:
    return " ".join(f"--set {override}" for override in student_overrides(values))


def ablation_plan(cfg: StudyConfig, prefix: str = "", prepared: str = PREPARED, phase: int = PHASES["ablation"]) -> dict:
    """Pseudo-labels and students of the self-training ablation: the DDeP teacher of each
    ablation subset labels the rest of the train images; one student per ABLATION row
    (`cfg.ablation_steps`); each CHAIN_ROWS student, if one of them, labels them again for a
    round-2 student with the same settings, and so on up to `cfg.rounds` rounds; the ROUNDS_ROW
    chain again with students of each of `cfg.student_epochs`. Every student's length is the
    study's own (`cfg.ablation_student_epochs` or `cfg.student_epochs` epochs of
    `cfg.student_steps_per_epoch` steps), set on its command whatever params.yaml's is."""
    ddep = prefix + pretrain_key("supervised", "ddep", cfg.ddep_sigma)
    steps_per_epoch = cfg.student_steps_per_epoch
    rows = cfg.ablation_steps

    def overrides(switches: dict, epochs: int | None = None) -> str:
        return _overrides({**switches, "epochs": epochs or cfg.ablation_student_epochs,
                           "steps_per_epoch": steps_per_epoch})

    pseudo, students = {}, {}
    for fraction in cfg.ablation_fractions:
        for seed in cfg.seeds:
            bare = subset_key(fraction, seed)
            point = {"subset": prefix + bare, "fraction": float(fraction), "seed": int(seed), "phase": phase,
                     "prepared": prepared}
            trained = {"pretrained": f"{STUDY_DIR}/models/pretrained-{ddep}.pt"}
            pseudo[f"{prefix}r1-{bare}"] = {**point, "teacher": f"{STUDY_DIR}/models/teacher-{ddep}-{bare}.pt",
                                           "teacher_metrics": f"{ddep}-{bare}.json", "round": 1}
            for row in rows:
                if row in CHAIN_ROWS:  # their chains of rounds below
                    continue
                students[f"{prefix}{row}-{bare}-r1"] = {**point, **trained, "row": row, "round": 1,
                                                        "pseudo": f"{prefix}r1-{bare}",
                                                        "teacher": pseudo[f"{prefix}r1-{bare}"]["teacher"],
                                                        "overrides": overrides(ABLATION[row][1])}
            chains = [(row, epochs) for row in CHAIN_ROWS if row in rows
                      for epochs in [None, *(cfg.student_epochs if row == ROUNDS_ROW else [])]]
            for row, epochs in chains:  # epochs None: the ablation's length
                longer = {} if epochs is None else {"epochs": epochs, "steps": epochs * steps_per_epoch}
                tag = ("" if row == ROUNDS_ROW else f"-{row}") + ("" if epochs is None else f"-e{epochs}")
                switches = overrides(ABLATION[row][1], epochs)
                labels = f"{prefix}r1-{bare}"  # round 1 learns from the teacher's, whatever its length
                teacher = pseudo[labels]["teacher"]
                for round_ in range(1, cfg.rounds + 1):
                    if round_ > 1:
                        labels = f"{prefix}r{round_}{tag}-{bare}"
                        pseudo[labels] = {**point, **longer, "teacher": teacher, "round": round_,
                                          **({} if row == ROUNDS_ROW else {"row": row})}
                    key = f"{prefix}{row}{'' if epochs is None else f'-e{epochs}'}-{bare}-r{round_}"
                    students[key] = {**point, **trained, **longer, "row": row, "round": round_, "pseudo": labels,
                                     "teacher": teacher, "overrides": switches}
                    teacher = f"{STUDY_DIR}/models/student-{key}.pt"
    return {"pseudo": pseudo, "students": students}


def dataset_plans(study_plan: dict) -> dict[str | None, dict]:
    """The plan cut by dataset: None (the pipeline's own), TUNING and the control's name -> its
    entries of every section, its key prefix and its role."""
    datasets = {None: {"out": PREPARED, "role": PIPELINE_DATA}, **study_plan.get("datasets", {})}
    return {name: {"prefix": f"{name}-" if name else "", "role": d["role"],
                   **{section: {k: v for k, v in study_plan[section].items() if v.get("prepared", PREPARED) == d["out"]}
                      for section in SECTIONS}}
            for name, d in datasets.items()}


def write_plan(params_file: str = PARAMS_FILE, path: Path = PLAN_FILE) -> dict:
    params = load_params(params_file)
    study_plan = plan(params.study, params.decoder_pretrain)
    header = "# Written by `python -m pipeline.tools.study plan` from params.yaml's `study` section.\n"
    text = header + yaml.safe_dump(study_plan, sort_keys=False)
    if not path.is_file() or path.read_text() != text:  # unchanged: keep DVC's view of it stable
        write_text_atomic(path, text)
    return study_plan


# ------------------------------------------------------------------------------ the report

@dataclass
class Point:
    mode: str
    init: str
    sigma: float
    fraction: float
    seed: int
    miou: float
    pretrain_epochs: int | None = None  # a pretraining-length point; None: the pipeline's length
    per_class_iou: dict[str, float] = field(default_factory=dict)
    boundary_f1: float = float("nan")  # NaN: a point scored before boundary F1 was measured


def _metrics(path: Path) -> dict | None:
    """A point's val metrics, or None while it has not been trained (a study still running)."""
    return json.loads(path.read_text()) if path.is_file() else None


def _miou(path: Path) -> float | None:
    metrics = _metrics(path)
    return None if metrics is None else metrics["miou"]


def collect(study_plan: dict, metrics_dir: Path) -> list[Point]:
    """One point per teacher of the plan that has its val metrics file."""
    points = []
    pretrainings = {**study_plan["pretrain"], **study_plan["pretrain_length"]}
    for key, teacher in study_plan["teachers"].items():
        pre = pretrainings[teacher["pretrain"]]
        metrics = _metrics(metrics_dir / f"{key}.json")
        if metrics is not None:
            points.append(Point(pre["mode"], pre["init"], pre["sigma"], teacher["fraction"], teacher["seed"],
                                metrics["miou"], pre.get("epochs"), metrics.get("per_class_iou", {}),
                                metrics.get("boundary_f1", float("nan"))))
    return points


FULLY_SUPERVISED = "fully supervised (100% labels)"
TEACHER_ROW = "teacher (DDeP)"


def ablation_rows(study_plan: dict, metrics_dir: Path, cfg: StudyConfig) -> dict[str, dict[float, dict[int, float]]]:
    """Row -> ablation fraction -> seed -> val mIoU of what is measured so far: the DDeP
    teacher, each student row, the later rounds, the pseudo-labels of each round (their mIoU on
    the images they label) and the fully supervised DDeP teacher (100% labels), in the
    report's order. Empty while no student has been trained. `study_plan`: one dataset's
    (dataset_plans)."""
    ddep = study_plan.get("prefix", "") + pretrain_key("supervised", "ddep", cfg.ddep_sigma)
    rows: dict[str, dict[float, dict[int, float]]] = {}

    def add(row: str, fraction: float, seed: int, value: float | None) -> None:
        cells = rows.setdefault(row, {})  # a row of the plan, measured or not yet
        if value is not None:
            cells.setdefault(fraction, {})[seed] = value

    for key, p in study_plan["pseudo"].items():
        add(pseudo_row(p["round"], p.get("steps"), p.get("row")), p["fraction"], p["seed"], _miou(metrics_dir / f"pseudo-{key}.json"))
        if p["round"] == 1:
            add(TEACHER_ROW, p["fraction"], p["seed"], _miou(metrics_dir / p["teacher_metrics"]))
    for key, st in study_plan["students"].items():
        add(student_row(st["row"], st["round"], st.get("steps")), st["fraction"], st["seed"],
            _miou(metrics_dir / f"student-{key}.json"))
    if max(cfg.fractions) == 1.0:
        for seed in cfg.seeds:
            full = _miou(metrics_dir / f"{ddep}-{subset_key(1.0, seed)}.json")
            for fraction in cfg.ablation_fractions:
                add(FULLY_SUPERVISED, fraction, seed, full)
    if not any((metrics_dir / f"student-{key}.json").is_file() for key in study_plan["students"]):
        return {}
    order = [TEACHER_ROW, *[label for label, _ in ABLATION.values()], *[row for row in rows if row.startswith("+ ")],
             FULLY_SUPERVISED, *sorted(row for row in rows if row.startswith("pseudo-labels"))]
    return {row: rows[row] for row in dict.fromkeys(order) if row in rows}


def student_row(row: str, round_: int, steps: int | None = None) -> str:
    """A student's row: its ablation row's label, then its length where it is not the
    ablation's and its rounds after the first."""
    return (ABLATION[row][0] + (f", {steps} steps" if steps else "")
            + (f", {round_} rounds" if round_ > 1 else ""))


def pseudo_row(round_: int, steps: int | None = None, row: str | None = None) -> str:
    """A round's pseudo-labels: made by the ROUNDS_ROW students unless `row` names others."""
    return (f"pseudo-labels, round {round_}" + (f" ({steps}-step students)" if steps else "")
            + (f" ({ABLATION[row][0].removeprefix('+ ')})" if row else ""))


def ablation_table(rows: dict[str, dict[float, dict[int, float]]], cfg: StudyConfig,
                   share: bool = False) -> dict[str, dict[float, tuple]]:
    """ablation_rows as row -> fraction -> (mean, std, n) over seeds; a cell of points not
    trained yet has n = 0. `share`: each seed's teacher or student mIoU as a share of that
    seed's fully supervised teacher (no pseudo-label rows)."""
    if share:
        full = rows.get(FULLY_SUPERVISED)
        if not full:
            return {}
        rows = {row: {f: _shares(cells, full.get(f, {})) for f, cells in rows[row].items()}
                for row in rows if row != FULLY_SUPERVISED and not row.startswith("pseudo-labels")}
    return {row: {f: _stats(list(cells.get(f, {}).values())) for f in cfg.ablation_fractions}
            for row, cells in rows.items()}


def _shares(values: dict[int, float], full: dict[int, float]) -> dict[int, float]:
    """Seed -> value / the same seed's fully supervised value, for the seeds that have both."""
    return {seed: value / full[seed] for seed, value in values.items() if full.get(seed)}


def per_class_table(points: list[Point], cfg: StudyConfig) -> dict[str, dict[str, tuple]]:
    """Figure 2's teachers at the sweep fraction, per class: curve -> class -> (mean, std, n) of
    val IoU. Where the initialisations' mIoU differ: which classes, not only how much."""
    table = {}
    for name, (init, mode) in CURVES.items():
        values: dict[str, list[float]] = {}
        for p in points:
            if _on_curve(p, init, mode, cfg) and p.fraction == cfg.sweep_fraction:
                for cls, iou in p.per_class_iou.items():
                    values.setdefault(cls, []).append(iou)
        table[name] = {cls: _stats(ious) for cls, ious in values.items()}
    return table


def _stats(values: list[float]) -> tuple[float, float, int]:
    if not values:
        return float("nan"), float("nan"), 0
    return float(np.mean(values)), float(np.std(values)), len(values)


def figure2(points: list[Point], cfg: StudyConfig,
            metric: str = "miou") -> dict[str, dict[float, tuple[float, float, int]]]:
    """curve -> fraction -> (mean, std, n) of the teachers' val `metric` (a Point field)."""
    return {name: {f: _stats([getattr(p, metric) for p in points
                              if _on_curve(p, init, mode, cfg) and p.fraction == f and not np.isnan(getattr(p, metric))])
                   for f in cfg.fractions}
            for name, (init, mode) in CURVES.items()}


def figure2_shares(points: list[Point], cfg: StudyConfig) -> dict[str, dict[float, tuple[float, float, int]]]:
    """curve -> fraction below 100% -> (mean, std, n) over seeds of teacher val mIoU as a share
    of the same seed's teacher of the same initialisation with every label. Empty when the
    study has no 100% column."""
    if max(cfg.fractions) != 1.0:
        return {}
    table = {}
    for name, (init, mode) in CURVES.items():
        on_curve = [p for p in points if _on_curve(p, init, mode, cfg)]
        full = {p.seed: p.miou for p in on_curve if p.fraction == 1.0}
        table[name] = {f: _stats(list(_shares({p.seed: p.miou for p in on_curve if p.fraction == f}, full).values()))
                       for f in cfg.fractions if f != 1.0}
    return table


def paired_difference(points: list[Point], cfg: StudyConfig, a: str, b: str) -> dict[float, tuple[float, float, int]]:
    """fraction -> (mean, std, n) over seeds of curve a's teacher mIoU minus curve b's, seed by
    seed (the same labeled subset and training seed): the comparison the seeds' spread is for."""
    by_curve = {name: {(p.fraction, p.seed): p.miou for p in points if _on_curve(p, *CURVES[name], cfg)}
                for name in (a, b)}
    return {f: _stats([by_curve[a][f, s] - by_curve[b][f, s] for s in cfg.seeds
                       if (f, s) in by_curve[a] and (f, s) in by_curve[b]]) for f in cfg.fractions}


def _on_curve(p: Point, init: str, mode: str, cfg: StudyConfig) -> bool:
    """A teacher of Figure 2's curve (init, mode): the pipeline's pretraining length, and for a
    pretrained decoder the σ Figure 2 uses for that mode."""
    sigma = {"dep": cfg.dep_sigma, "ddep": cfg.ddep_sigma}
    return ((p.init, p.mode) == (init, mode) and p.pretrain_epochs is None
            and (mode == "none" or p.sigma == sigma[mode]))


def sigma_sweep(points: list[Point], cfg: StudyConfig) -> dict[str, dict[float, tuple[float, float, int]]]:
    """DDeP / DeP -> σ -> (mean, std, n) of teacher val mIoU at the sweep fraction."""
    return {label: {s: _stats([p.miou for p in points if p.mode == mode and p.sigma == s
                               and p.fraction == cfg.sweep_fraction and p.pretrain_epochs is None]) for s in cfg.sigmas}
            for label, mode in (("DDeP", "ddep"), ("DeP", "dep"))}


def pretrain_length_table(points: list[Point], study_plan: dict, metrics_dir: Path,
                          cfg: StudyConfig) -> dict[str, dict]:
    """Row -> {"loss": final denoising loss (None: not trained yet), fraction: (mean, std, n)
    of teacher val mIoU}: the supervised encoder without decoder pretraining, then DDeP at each length (the
    pipeline's own length reads Figure 2's DDeP teachers)."""
    def cells(keep) -> dict[float, tuple]:
        return {f: _stats([p.miou for p in points if p.fraction == f and keep(p)]) for f in cfg.pretrain_fractions}

    rows = {"supervised encoder, no decoder pretraining":
            {**cells(lambda p: (p.init, p.mode, p.pretrain_epochs) == ("supervised", "none", None))}}
    for key, pre in sorted(study_plan["pretrain_length"].items(), key=lambda kv: kv[1]["epochs"]):
        epochs = None if pre["default"] else pre["epochs"]
        rows[f"DDeP, {pre['steps']} steps" + (" (Figure 2's)" if pre["default"] else "")] = {
            "loss": _final_loss(metrics_dir / f"pretrain-{key}.csv"),
            **cells(lambda p: (p.mode, p.sigma, p.pretrain_epochs) == ("ddep", cfg.ddep_sigma, epochs))}
    return rows


def _final_loss(curve: Path) -> float | None:
    """The last epoch's training loss of a `--curves` CSV, None while it is not trained."""
    if not curve.is_file():
        return None
    header, *rows = curve.read_text().splitlines()
    return float(rows[-1].split(",")[header.split(",").index("loss")]) if rows else None


def _cell(stat: tuple[float, float, int], seeds: int, percent: bool = False) -> str:
    """mean ± std over the seeds; a point with fewer seeds so far says how many; – for none."""
    mean, std, n = stat
    if n == 0:
        return "–"
    value = f"{mean:.0%} ± {std:.0%}" if percent else f"{mean:.3f} ± {std:.3f}"
    return value if n >= seeds else f"{value.split(' ±')[0]} ({n} of {seeds} seeds)"


def markdown(fig2: dict, sweep: dict, cfg: StudyConfig, ablation: dict | None = None, length: dict | None = None,
             per_class: dict | None = None, *, boundary: dict | None = None, shares: dict | None = None,
             ablation_shares: dict | None = None, findings: list[str] | None = None) -> str:
    """One dataset's report: its findings in sentences, then the tables they come from."""
    seeds = len(cfg.seeds)
    fractions = list(next(iter(fig2.values())))
    steps = ", ".join(f"{cfg.steps_for(f)} steps at {f:.0%}" for f in cfg.fractions)
    lines = []
    if findings:
        lines += [f"- {sentence}" for sentence in findings] + [""]
    lines += [(f"Teacher val mIoU, mean ± std over {seeds} seeds (labeled subset and training seed); "
               f"teachers trained {steps}; DDeP σ = {cfg.ddep_sigma:g}, DeP σ = {cfg.dep_sigma:g}."), ""]
    lines += _table("initialisation", [f"{f:.0%} labels" for f in fractions],
                    {name: [_cell(row[f], seeds) for f in fractions] for name, row in fig2.items()})
    if shares:
        below = list(next(iter(shares.values())))
        lines += ["", ("The same teachers' mIoU as a share of the teacher of the same initialisation and seed "
                       "trained with every label:"), ""]
        lines += _table("initialisation", [f"{f:.0%} labels" for f in below],
                        {name: [_cell(row[f], seeds, percent=True) for f in below] for name, row in shares.items()})
    if boundary:
        lines += ["", ("The same teachers' boundary F1 (predicted and true class boundaries within 2 px of "
                       "each other, per class, averaged):"), ""]
        lines += _table("initialisation", [f"{f:.0%} labels" for f in fractions],
                        {name: [_cell(row[f], seeds) for f in fractions] for name, row in boundary.items()})
    sigmas = list(next(iter(sweep.values())))
    lines += ["", f"σ sweep at {cfg.sweep_fraction:.0%} labels:", ""]
    lines += _table("pretraining", [f"σ = {s:g}" for s in sigmas],
                    {name: [_cell(row[s], seeds) for s in sigmas] for name, row in sweep.items()})
    if length:
        lines += ["", (f"Length of the DDeP pretraining (σ = {cfg.ddep_sigma:g}), teacher val mIoU; the loss is the "
                       "last epoch's denoising loss, 1.0 = predicting no noise at all:"), ""]
        lines += _table("decoder pretraining", ["final denoising loss", *(f"{f:.0%} labels" for f in cfg.pretrain_fractions)],
                        {name: [_loss_cell(row), *(_cell(row[f], seeds) for f in cfg.pretrain_fractions)]
                         for name, row in length.items()})
    classes = list(dict.fromkeys(c for row in (per_class or {}).values() for c in row))
    if classes:
        lines += ["", f"Per-class val IoU of the teachers above at {cfg.sweep_fraction:.0%} labels:", ""]
        # "n/a": a class no teacher of the row predicted and no val pixel holds (it is not in its mIoU).
        lines += _table("class", list(per_class),
                        {c: [("–" if not row else _cell(row[c], seeds) if c in row else "n/a") for row in per_class.values()]
                         for c in classes})
    lines += ["", ("Self-training ablation (student val mIoU; pseudo-label rows: mIoU of the pseudo-labels "
                   f"on the images they label; students train {cfg.ablation_student_steps} steps where a row names "
                   "no other number):"), ""]
    if ablation:
        columns = list(next(iter(ablation.values())))
        share_columns = [f"{f:.0%} labels, share of fully supervised" for f in columns] if ablation_shares else []
        lines += _table("", [f"{f:.0%} labels" for f in columns] + share_columns,
                        {name: [_cell(row[f], seeds) for f in columns]
                         + [_cell(ablation_shares[name][f], seeds, percent=True) if name in ablation_shares else ""
                            for f in (columns if ablation_shares else [])]
                         for name, row in ablation.items()})
    else:
        lines += ["(not trained yet)"]
    return "\n".join(lines) + "\n"


def _table(corner: str, columns: list[str], rows: dict[str, list[str]]) -> list[str]:
    return ([f"| {corner} | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
            + [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()])


def findings(points: list[Point], rows: dict, cfg: StudyConfig, pipeline_row: str | None) -> list[str]:
    """The study's answers to the user's questions, each a sentence computed from the tables
    below it (what README.md says about the method comes from here, never typed by hand)."""
    seeds, f = len(cfg.seeds), cfg.sweep_fraction
    said = []
    supervised = figure2_shares(points, cfg).get("supervised encoder", {}).get(f)
    if supervised and supervised[2]:
        said.append(f"**Headroom**: at {f:.0%} labels the teacher from the supervised encoder alone reaches "
                    f"{_cell(supervised, seeds, percent=True)} of the same teacher with every label "
                    "(Pascal VOC at 1/16 of its labels: 61%, Cityscapes at 1/16: 83%).")
    gaps = [(fraction, gap) for fraction, gap in paired_difference(points, cfg, "DDeP", "supervised encoder").items()
            if fraction <= f and gap[2]]
    if gaps:
        said.append("**DDeP against the supervised encoder alone** (teacher mIoU, DDeP minus it, seed by seed): "
                    + "; ".join(f"{fraction:.0%} labels {_signed(gap, seeds)}, {_verdict(gap)}" for fraction, gap in gaps)
                    + ". The paper has DDeP ahead at every fraction, most below 5%.")
    students = {row: cells.get(f, {}) for row, cells in student_rows(rows).items() if cells.get(f)}
    full, teacher = rows.get(FULLY_SUPERVISED, {}).get(f, {}), rows.get(TEACHER_ROW, {}).get(f, {})

    def best(longer: bool) -> str | None:
        return max((row for row in students if longer_student(row) == longer),
                   key=lambda row: _stats(list(students[row].values()))[0], default=None)

    for row in dict.fromkeys([pipeline_row, best(False), best(True)]):
        if row is None or not students.get(row):
            continue
        share = _stats(list(_shares(students[row], full).values()))
        gain = _stats([value - teacher[seed] for seed, value in students[row].items() if seed in teacher])
        who = ("The pipeline's student" if row == pipeline_row else "A longer student" if longer_student(row)
               else "The best student of the ablation")
        sentence = f"**{who}** ({row.removeprefix('+ ')}) at {f:.0%} labels"
        if share[2]:
            sentence += f" reaches {_cell(share, seeds, percent=True)} of the fully supervised DDeP teacher (target: 90%)"
        if gain[2]:
            sentence += (f"{',' if share[2] else ''} and its mIoU minus its teacher's, seed by seed, is "
                         f"{_signed(gain, seeds)}: {_verdict(gain)}")
        said.append(sentence + ".")
    return said


def _ablation_key(student) -> str | None:
    """The ABLATION row whose switches are `student`'s settings, if one is."""
    return next((key for key, (_, switches) in ABLATION.items()
                 if all(getattr(student, name) == value for name, value in switches.items())), None)


def pipeline_recipe(student, rounds: int = 1) -> str | None:
    """The ablation row (at the ablation's length) whose switches are the pipeline's own student
    settings (`student` of params.yaml) with its number of self-training rounds, if one is."""
    key = _ablation_key(student)
    return student_row(key, rounds) if key and (rounds == 1 or key in CHAIN_ROWS) else None


def pipeline_row(student, rounds: int, cfg: StudyConfig) -> str | None:
    """The row of the pipeline's own student: its recipe's row (`pipeline_recipe`) where it
    trains the ablation's steps, the row of its longer chain where it trains as many steps as
    one of `cfg.student_epochs`; None where the study has no student like it."""
    recipe = pipeline_recipe(student, rounds)
    steps = student.epochs * student.steps_per_epoch
    if recipe is None or steps == cfg.ablation_student_steps:
        return recipe
    longer = {epochs * cfg.student_steps_per_epoch for epochs in cfg.student_epochs}
    return student_row(ROUNDS_ROW, rounds, steps) if recipe == student_row(ROUNDS_ROW, rounds) and steps in longer else None


def student_rows(rows: dict) -> dict:
    """The ablation rows of students: no teacher, fully supervised or pseudo-label row."""
    return {row: cells for row, cells in rows.items()
            if row not in (TEACHER_ROW, FULLY_SUPERVISED) and not row.startswith("pseudo-labels")}


def longer_student(row: str) -> bool:
    """A row of students longer than the ablation's (`study.student_epochs`): how much a longer
    student gains, not a recipe to choose (the step budget is the budget curve's choice)."""
    return re.search(r", \d+ steps", row) is not None


def chosen_recipe(rows: dict, cfg: StudyConfig) -> str | None:
    """The student row with the best mean mIoU over the ablation's fractions and seeds, once
    every student row has all of its points (None before); rows of longer students are not
    choices."""
    students = {row: cells for row, cells in student_rows(rows).items() if not longer_student(row)}
    cells = {row: [v for f in cfg.ablation_fractions for v in by_fraction.get(f, {}).values()]
             for row, by_fraction in students.items()}
    complete = len(cfg.ablation_fractions) * len(cfg.seeds)
    if not cells or any(len(values) < complete for values in cells.values()):
        return None
    return max(cells, key=lambda row: float(np.mean(cells[row])))


def _signed(stat: tuple[float, float, int], seeds: int) -> str:
    mean, std, n = stat
    return f"{mean:+.3f} ± {std:.3f}" + (f" ({n} of {seeds} seeds)" if n < seeds else "")


def _verdict(stat: tuple[float, float, int]) -> str:
    """Whether a seed-by-seed difference is larger than its spread over the seeds."""
    mean, std, n = stat
    if n < 2:
        return "one seed so far"
    if abs(mean) <= std:
        return "within the seeds' spread"
    return "ahead by more than the seeds' spread" if mean > 0 else "behind by more than the seeds' spread"


def _loss_cell(row: dict) -> str:
    if "loss" not in row:
        return "n/a"  # no denoising pretraining
    return "–" if row["loss"] is None else f"{row['loss']:.3f}"


def result_files(study_plan: dict) -> list[tuple[str, str]]:
    """(study stage, its metrics file in study/metrics) for every point the plan trains, in the
    order `run` trains them (PHASES, the control's after the pipeline's): the ablation's rounds
    one after the other, the pretraining-length check's loss curves before its teachers."""
    # (phase, step within the phase, stage, result); sorting keeps the plan's order within a step.
    points = ([(t["phase"], 2 if t["pretrain"] in study_plan["pretrain_length"] else 0, f"teacher@{key}", f"{key}.json")
               for key, t in study_plan["teachers"].items()]
              + [(p["phase"], 2 * p["round"] - 2, f"pseudo@{key}", f"pseudo-{key}.json")
                 for key, p in study_plan["pseudo"].items()]
              + [(st["phase"], 2 * st["round"] - 1, f"student@{key}", f"student-{key}.json")
                 for key, st in study_plan["students"].items()]
              + [(pre["phase"], 1, f"pretrain_length@{key}", f"pretrain-{key}.csv")
                 for key, pre in study_plan["pretrain_length"].items()])
    return [(stage, result) for _, _, stage, result in sorted(points, key=lambda p: p[:2])]


def planned_points(study_plan: dict) -> int:
    return len(result_files(study_plan))


def measured_points(study_plan: dict, metrics_dir: Path) -> int:
    return sum((metrics_dir / name).is_file() for _, name in result_files(study_plan))


def write_outputs(fig2: dict, sweep: dict, out_dir: Path, suffix: str = "") -> None:
    """CSV tables for `dvc plots` (one column per curve) and the PNG figures; `suffix` after
    each file's name (a control dataset's)."""
    from pipeline.infer.figures import mean_curves

    for name, table, x in ((f"figure2{suffix}", fig2, "fraction"), (f"sigma_sweep{suffix}", sweep, "sigma")):
        xs = list(next(iter(table.values())))
        header = [x] + [f"{c} {part}" for c in table for part in ("mean", "std")]
        # A point not trained yet is an empty cell, which `dvc plots` and a spreadsheet read as missing.
        rows = [",".join(header)] + [",".join([f"{v:g}"] + [_csv_number(table[c][v][i]) for c in table for i in (0, 1)])
                                     for v in xs]
        write_text_atomic(out_dir / f"{name}.csv", "\n".join(rows) + "\n")
    mean_curves({c: (list(r), [m for m, _, _ in r.values()], [s for _, s, _ in r.values()]) for c, r in fig2.items()},
                "labeled fraction of the train scenes", "teacher val mIoU", "Label efficiency (DDeP paper, Fig. 2)",
                out_dir / f"figure2{suffix}.png", log_x=True)
    mean_curves({c: (list(r), [m for m, _, _ in r.values()], [s for _, s, _ in r.values()]) for c, r in sweep.items()},
                "σ", "teacher val mIoU", "Noise level of denoising pretraining", out_dir / f"sigma_sweep{suffix}.png",
                log_x=True)


DATASET_TITLES = {"shapes": "Shape scenes", "digits": "Digit scenes"}


def dataset_report(sub_plan: dict, name: str | None, metrics_dir: Path, cfg: StudyConfig, student, rounds: int,
                   out_dir: Path, pipeline_format: str) -> str:
    """One dataset's section of the report, its findings first (a dataset_plans entry and its
    name, None for the pipeline's own data); writes its CSVs and figures into `out_dir`, a
    control's with its name after each file's."""
    control = sub_plan["role"] == CONTROL
    if control:
        cfg = replace(cfg, seeds=cfg.control_seeds)
    points = collect(sub_plan, metrics_dir)
    fig2, sweep = figure2(points, cfg), sigma_sweep(points, cfg)
    rows = ablation_rows(sub_plan, metrics_dir, cfg)
    write_outputs(fig2, sweep, out_dir, f"-{name}" if control else "")
    title = name or pipeline_format
    described = (f"the control, `study.control: {name}`" if control
                 else f"the pipeline's own data, `data.format: {pipeline_format}`")
    body = markdown(fig2, sweep, cfg, ablation_table(rows, cfg), pretrain_length_table(points, sub_plan, metrics_dir, cfg),
                    per_class_table(points, cfg),
                    boundary=figure2(points, cfg, "boundary_f1"), shares=figure2_shares(points, cfg),
                    ablation_shares=ablation_table(rows, cfg, share=True),
                    findings=findings(points, rows, cfg, pipeline_row(student, rounds, cfg)))
    return f"### {DATASET_TITLES.get(title, title)} ({described}), {len(cfg.seeds)} seeds\n\n{body}"


def recipe_report(sub_plan: dict, metrics_dir: Path, cfg: StudyConfig, student, rounds: int,
                  val_plan: dict | None = None) -> str:
    """The recipe choice's section: the ablation's students scored on the tuning split, the
    row chosen there and whether the pipeline's student (params.yaml) is that row; beside
    them the same rows on val (`val_plan`: the pipeline data's part of the plan), shown, never
    chosen from."""
    tuning = replace(cfg, seeds=cfg.tuning_seeds)
    rows = ablation_rows(sub_plan, metrics_dir, tuning)
    table = ablation_table(student_rows(rows), tuning)
    val_rows = ablation_rows(val_plan, metrics_dir, cfg) if val_plan else {}
    val = ablation_table(student_rows(val_rows), cfg)
    seeds = len(tuning.seeds)
    lines = [f"### Recipe choice (the tuning split: `data.tuning`), {seeds} seed{'s' if seeds > 1 else ''}", "",
             ("The ablation's students once more, scored on the tuning split's val (`data.tuning`: never "
              "the val split); the best row is the ablation's choice of student recipe."
              + (" The val columns are the same rows of the ablation above, for comparison: never chosen from."
                 if val else "")), ""]
    if not table:
        return "\n".join([*lines, "(not trained yet)"]) + "\n"
    fractions = cfg.ablation_fractions
    columns = [f"{f:.0%} labels" for f in fractions] + ([f"{f:.0%} labels, val" for f in fractions] if val else [])
    lines += _table("", columns, {
        row: [_cell(cells[f], seeds) for f in fractions]
        + ([_cell(val.get(row, {}).get(f, (0.0, 0.0, 0)), len(cfg.seeds)) for f in fractions] if val else [])
        for row, cells in table.items()})
    chosen, ours = chosen_recipe(rows, tuning), pipeline_recipe(student, rounds)
    if chosen:
        verdict = "the same" if chosen == ours else f"not the same: params.yaml's is {ours or 'no row of the ablation'}"
        steps = student.epochs * student.steps_per_epoch
        if steps != cfg.ablation_student_steps:
            verdict += f", trained {steps} steps (the budget curve's choice) where the rows here train {cfg.ablation_student_steps}"
        lines += ["", f"**Chosen: {chosen.removeprefix('+ ')}**; the pipeline's student (params.yaml) is {verdict}."]
        on_val = chosen_recipe(val_rows, cfg)
        if on_val:
            lines += ["", f"On val the best of the same rows is {on_val.removeprefix('+ ')}"
                          + (", as on the tuning split." if on_val == chosen else ".")]
    if any(longer_student(row) for row in table):
        lines += ["", ("Rows with a number of steps are longer students (`study.student_epochs`), not choices "
                       "here: the pipeline's step budget is the budget curve's choice.")]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class StudyReport:
    text: str  # report.md
    measured: int  # points with results so far
    planned: int  # points in the plan


def report(study_plan: dict, metrics_dir: Path, cfg: StudyConfig, student, rounds: int, out_dir: Path,
           pipeline_format: str, commit: str) -> StudyReport:
    """The whole report: a study still running says so above everything, then the commit it
    ran at and a section per dataset (the pipeline's own first, the recipe choice, then the
    control). `student`, `rounds`: the pipeline's student settings and self-training rounds."""
    measured, planned = measured_points(study_plan, metrics_dir), planned_points(study_plan)
    partial = (f"**Partial: {measured} of {planned} points measured so far** (– = not trained yet).\n\n"
               if measured < planned else "")
    parts = dataset_plans(study_plan)
    sections = [recipe_report(sub_plan, metrics_dir, cfg, student, rounds, parts[None]) if sub_plan["role"] == RECIPE_CHOICE
                else dataset_report(sub_plan, name, metrics_dir, cfg, student, rounds, out_dir, pipeline_format)
                for name, sub_plan in parts.items()]
    return StudyReport(f"{partial}Commit `{commit}`.\n\n" + "\n".join(sections), measured, planned)


def _csv_number(value: float) -> str:
    return "" if np.isnan(value) else f"{value:.4f}"


def update_readme(report: Path = STUDY_DIR / "report" / "report.md", readme: Path = Path("README.md")) -> None:
    if not report.is_file():
        raise ConfigError(f"{report}: missing; run `dvc repro --single-item study/dvc.yaml:report` first")
    write_block(readme, README_BEGIN, README_END, report.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="run", choices=["run", "plan", "readme"])
    parser.add_argument("dvc_args", nargs="*", help="extra arguments for `dvc repro` (after --)")
    args = parser.parse_args(argv)
    try:
        if args.command == "readme":
            update_readme()
            return
        study_plan = write_plan()
    except ConfigError as err:
        sys.exit(f"error: {err}")
    print(f"study: {len(study_plan['pretrain']) + len(study_plan['pretrain_length'])} pretrainings, "
          f"{len(study_plan['subsets'])} labeled subsets, "
          f"{len(study_plan['teachers'])} teachers -> {PLAN_FILE}", flush=True)
    if args.command == "run":
        sys.exit(run(study_plan, args.dvc_args))


def run(study_plan: dict, dvc_args: list[str]) -> int:
    """Train the plan's points one `dvc repro` target at a time, teachers cheapest first (DVC's
    own order is a graph walk), then the ablation, then the report. A point whose result is
    recorded (its metrics file is here and `DvcState.recorded`) is skipped even when its models
    are not. Each point's stage runs on its own (`--single-item`), after its missing inputs."""
    # This interpreter's environment (a venv that is not activated) runs `dvc` and the stages.
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    dvc_file = STUDY_DIR / "dvc.yaml"
    metrics = STUDY_DIR / "metrics"
    # The data and models the recorded points were trained from, as they were (a retrained
    # copy on another CPU differs in the last bits, which would make every point downstream stale).
    stored = [PREPARED, SUPERVISED_ENCODER, f"{dvc_file}:encoder_random", f"{dvc_file}:pretrain",
              f"{dvc_file}:pretrain_length",
              *sorted({p["teacher"] for p in study_plan["pseudo"].values()})]
    subprocess.call(["dvc", "pull", "--allow-missing", "-r", STORE, *stored], env=env)
    try:
        state = DvcState.read(dvc_file, env)
        points = result_files(study_plan)
        todo = [name for name, result in points
                if not ((metrics / result).is_file() and state.recorded(f"{dvc_file}:{name}"))]
        progress = Progress(len(points), len(todo))
        for name in todo:
            print(progress.line(name), flush=True)
            target = f"{dvc_file}:{name}"
            for stage in [*state.missing_inputs(target), target]:
                if code := subprocess.call(["dvc", "repro", "--single-item", stage, *dvc_args], env=env):
                    return code
                state.made(stage)
            progress.point_done()
        return subprocess.call(["dvc", "repro", "--single-item", f"{dvc_file}:report", *dvc_args], env=env)
    finally:
        subprocess.call(["dvc", "push", "-r", STORE, *stored], env=env)


@dataclass
class Progress:
    """The runner's line before each point it trains: which one, how many are recorded, and the
    time left at this run's pace so far (points differ: a teacher with every label trains 8×
    the steps of one with 1%, and the plan runs the cheaper ones of a phase first)."""
    planned: int
    to_train: int
    trained: int = 0
    started: float = field(default_factory=time.monotonic)

    def point_done(self) -> None:
        self.trained += 1

    def line(self, name: str, now: float | None = None) -> str:
        done = f"{self.planned - self.to_train + self.trained} of {self.planned} points recorded"
        text = f"study: {name} ({done}; {self.to_train - self.trained} to train"
        if self.trained:
            left = round(((time.monotonic() if now is None else now) - self.started) / self.trained * (self.to_train - self.trained))
            text += f", about {left // 3600} h {left % 3600 // 60:02d} min at this run's pace"
        return text + ")"


@dataclass
class DvcState:
    """What the runner asks DVC, read once at its start (one `dvc status` and one `dvc dag` of
    the repository, ~10 s, where asking per point cost ~3 s for each recorded point) and kept
    current by `made` as the runner runs stages: nothing else runs stages meanwhile."""
    locked: set[str]  # the study's stages its lock holds a result for, as `dvc.yaml:name`
    status: dict[str, list]  # `dvc status --json`: each stage that is not up to date, and why
    parents: dict[str, set[str]]  # the stages whose outputs each stage reads
    absent: set[str]  # the stages some of whose outputs are not here

    @classmethod
    def read(cls, dvc_file: Path, env: dict) -> DvcState:
        lock_file = dvc_file.with_suffix(".lock")
        lock = (yaml.safe_load(lock_file.read_text()) if lock_file.is_file() else None) or {}
        status = json.loads(subprocess.run(["dvc", "status", "--json"], env=env, capture_output=True, text=True,
                                           check=True).stdout or "{}")
        graph = subprocess.run(["dvc", "dag", "--dot"], env=env, capture_output=True, text=True, check=True).stdout
        parents: dict[str, set[str]] = {}
        for parent, child in re.findall(r'^"([^"]+)" -> "([^"]+)";$', graph, re.MULTILINE):
            parents.setdefault(child, set()).add(parent)
        absent = {stage for stage, changes in status.items()
                  if any(not Path(path).exists() for change in changes if isinstance(change, dict)
                         for path in change.get("changed outs", {}))}
        return cls({f"{dvc_file}:{name}" for name in lock.get("stages") or {}}, status, parents, absent)

    def recorded(self, stage: str) -> bool:
        """Whether the study's lock holds this stage's result for its current command, params, code
        and inputs, even if the files it made are not here. `study/dvc.lock` and the small metrics
        files are committed, the models are not: a fresh clone keeps every finished point without
        retraining it, and trains a point again only when something it depends on changed.
        An input the study itself made (`study/data`, `study/models`) may differ: made again on
        another machine (pseudo-labels, which the store does not keep), its last bits differ, and
        the stage that makes it is judged on its own command, params and code, as this one is."""
        return stage in self.locked and all(_still_valid(change) for change in self.status.get(stage, []))

    def missing_inputs(self, stage: str) -> list[str]:
        """The stages above this one whose outputs it needs and are not here after the store's
        pull, upstream first: what the store does not keep (labeled subsets, made again bit for
        bit; pseudo-labels, a few pixels apart on another CPU) or what was never made (a new
        pretraining). Each is run on its own, because `dvc repro` of the point would also retrain
        any recorded point between them whose input came out other in its last bits. A stage
        whose outputs are here is not looked above."""
        needed: list[str] = []
        todo = [stage]
        while todo:  # from the stage up, through absent stages only
            for parent in sorted(self.parents.get(todo.pop(), set()) & self.absent - set(needed)):
                needed.append(parent)
                todo.append(parent)
        return _topological(needed, self.parents)

    def made(self, stage: str) -> None:
        self.absent.discard(stage)


def _topological(nodes: list[str], parents: dict[str, set[str]]) -> list[str]:
    """`nodes` with each after those of its parents among them (and otherwise in their order)."""
    ordered: list[str] = []
    while len(ordered) < len(nodes):
        ordered.append(next(n for n in nodes if n not in ordered and parents.get(n, set()) & set(nodes) <= set(ordered)))
    return ordered


def _still_valid(change) -> bool:
    """A `dvc status` entry that only says files are absent, or that an input the study made is
    another copy (a changed command is a bare string, changed params a nested dict, a changed
    file 'modified' or 'new')."""
    if not isinstance(change, dict) or not set(change) <= {"changed deps", "changed outs"}:
        return False
    absent = ("deleted", "not in cache")
    made_here = (f"{STUDY_DIR}/data/", f"{STUDY_DIR}/models/")
    return (all(state in absent for state in change.get("changed outs", {}).values())
            and all(state in absent or (state == "modified" and path.startswith(made_here))
                    for path, state in change.get("changed deps", {}).items()))


if __name__ == "__main__":
    main()
