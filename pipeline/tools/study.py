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
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from pipeline.config.params import PARAMS_FILE, ConfigError, DecoderPretrainConfig, StudyConfig, load_params
from pipeline.data.atomic import write_text_atomic

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

# The self-training ablation, in the order Simple Baseline's recipe adds its pieces: each row
# sets every switch, so a row means the same whatever params.yaml's student defaults are.
_OFF = {"strong_augment": False, "dsbn": False, "pseudo_loss": "ce", "copy_paste_probability": 0.0,
        "dense_contrast_weight": 0.0}
_STEPS = [("plain-ce", "student, plain CE", {}),
          ("strong-aug", "+ strong augmentation", {"strong_augment": True}),
          ("dsbn", "+ DSBN", {"dsbn": True}),
          ("self-correction", "+ self-correction loss", {"pseudo_loss": "self_correction"}),
          ("copy-paste", "+ copy-paste", {"copy_paste_probability": 0.5}),
          ("dense-contrast", "+ dense contrast", {"dense_contrast_weight": 0.1})]


def _cumulative() -> dict[str, tuple[str, dict]]:
    """Each row: every switch off, plus what this step and all steps before it turned on."""
    rows, switches = {}, dict(_OFF)
    for key, label, added in _STEPS:
        switches = {**switches, **added}
        rows[key] = (label, switches)
    return rows


ABLATION = _cumulative()
SECOND_ROUND = "dense-contrast"  # the row that also gets a second round


def _tag(value: float) -> str:
    """A number as DVC stage names allow it (no dots): 0.05 -> 0p05."""
    return f"{value:g}".replace(".", "p")


def pretrain_key(encoder: str, mode: str, sigma: float) -> str:
    return encoder if mode == "none" else f"{mode}-s{_tag(sigma)}"


def subset_key(fraction: float, seed: int) -> str:
    return f"f{_tag(fraction * 100)}-seed{seed}"


def plan(cfg: StudyConfig, pretraining: DecoderPretrainConfig | None = None) -> dict:
    """Every pretraining, labeled subset and teacher the study needs, each once. `pretraining`
    (params.yaml's decoder_pretrain) is the length every pretraining has but the longer DDeP
    ones of `pretrain_length`."""
    pretraining = pretraining or DecoderPretrainConfig()
    curve_sigma = {"dep": cfg.dep_sigma, "ddep": cfg.ddep_sigma, "none": 0.0}
    pretrain, pretrain_length, subsets, teachers = {}, {}, {}, {}

    def add_teachers(key: str, fraction: float) -> None:
        for seed in cfg.seeds:
            subsets[subset_key(fraction, seed)] = {"fraction": float(fraction), "seed": int(seed)}
            teachers[f"{key}-{subset_key(fraction, seed)}"] = {
                "pretrain": key, "subset": subset_key(fraction, seed), "fraction": float(fraction), "seed": int(seed),
                "epochs": cfg.teacher_epochs, "steps_per_epoch": cfg.steps_for(fraction) // cfg.teacher_epochs}

    def add(encoder: str, mode: str, sigma: float, fraction: float) -> None:
        key = pretrain_key(encoder, mode, sigma)
        pretrain[key] = {"encoder": SUPERVISED_ENCODER if encoder == "supervised" else RANDOM_ENCODER,
                         "init": encoder, "mode": mode,
                         "sigma": float(sigma if mode != "none" else cfg.ddep_sigma)}  # none: σ unused
        add_teachers(key, fraction)

    for encoder, mode in CURVES.values():
        for fraction in cfg.fractions:
            add(encoder, mode, curve_sigma[mode], fraction)
    for mode, encoder in (("ddep", "supervised"), ("dep", "random")):
        for sigma in cfg.sigmas:
            add(encoder, mode, sigma, cfg.sweep_fraction)
    # The pretraining-length check: Figure 2's DDeP again, only to record its denoising loss
    # curve (its teachers are Figure 2's), then longer, each with teachers of its own.
    ddep = pretrain_key("supervised", "ddep", cfg.ddep_sigma)
    lengths = sorted({pretraining.epochs, *cfg.pretrain_epochs}) if cfg.pretrain_epochs and cfg.pretrain_fractions else []
    for epochs in lengths:
        key = f"{ddep}-e{epochs}"
        pretrain_length[key] = {**pretrain[ddep], "epochs": int(epochs),
                                "steps": int(epochs * pretraining.steps_per_epoch),
                                "default": epochs == pretraining.epochs}
        if epochs != pretraining.epochs:
            for fraction in cfg.pretrain_fractions:
                add_teachers(key, fraction)
    # Cheapest first: `run` trains them in this order, so a partial study has whole columns.
    ordered = sorted(teachers.items(), key=lambda kv: (kv[1]["fraction"], kv[1]["seed"]))
    return {"pretrain": pretrain, "pretrain_length": pretrain_length, "subsets": subsets,
            "teachers": dict(ordered), **ablation_plan(cfg)}


def _overrides(values: dict) -> str:
    return " ".join(f"--set student.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items())


def ablation_plan(cfg: StudyConfig) -> dict:
    """Pseudo-labels and students of the self-training ablation: the DDeP teacher of each
    ablation subset labels the rest of the train images; one student per ABLATION row; the
    SECOND_ROUND student labels them again for a round-2 student with the same settings."""
    ddep = pretrain_key("supervised", "ddep", cfg.ddep_sigma)
    pseudo, students = {}, {}
    for fraction in cfg.ablation_fractions:
        for seed in cfg.seeds:
            subset = subset_key(fraction, seed)
            point = {"subset": subset, "fraction": float(fraction), "seed": int(seed)}
            pseudo[f"r1-{subset}"] = {**point, "teacher": f"study/models/teacher-{ddep}-{subset}.pt", "round": 1}
            for row, (_, values) in ABLATION.items():
                students[f"{row}-{subset}-r1"] = {**point, "row": row, "round": 1, "pseudo": f"r1-{subset}",
                                                  "teacher": pseudo[f"r1-{subset}"]["teacher"],
                                                  "overrides": _overrides(values)}
            first = f"study/models/student-{SECOND_ROUND}-{subset}-r1.pt"
            pseudo[f"r2-{subset}"] = {**point, "teacher": first, "round": 2}
            students[f"{SECOND_ROUND}-{subset}-r2"] = {**point, "row": SECOND_ROUND, "round": 2,
                                                       "pseudo": f"r2-{subset}", "teacher": first,
                                                       "overrides": _overrides(ABLATION[SECOND_ROUND][1])}
    return {"ddep_pretrained": f"study/models/pretrained-{ddep}.pt", "pseudo": pseudo, "students": students}


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
                                metrics["miou"], pre.get("epochs"), metrics.get("per_class_iou", {})))
    return points


def ablation_table(study_plan: dict, metrics_dir: Path, cfg: StudyConfig) -> dict[str, dict[float, tuple]]:
    """Row -> ablation fraction -> (mean, std, n) of val mIoU: the DDeP teacher, each student
    row, the second round, the pseudo-labels of each round (their mIoU on the images they
    label), and the fully supervised teacher (100% labels) as the upper line. Empty while no
    student has been trained; a cell of points not trained yet has n = 0."""
    ddep = pretrain_key("supervised", "ddep", cfg.ddep_sigma)
    rows: dict[str, dict[float, list[float]]] = {}

    def add(row: str, fraction: float, value: float | None) -> None:
        cells = rows.setdefault(row, {})  # a row of the plan, measured or not yet
        if value is not None:
            cells.setdefault(fraction, []).append(value)

    for key, p in study_plan["pseudo"].items():
        add(f"pseudo-labels, round {p['round']}", p["fraction"], _miou(metrics_dir / f"pseudo-{key}.json"))
        if p["round"] == 1:
            add("teacher (DDeP)", p["fraction"], _miou(metrics_dir / f"{ddep}-{p['subset']}.json"))
    for key, st in study_plan["students"].items():
        label = ABLATION[st["row"]][0] if st["round"] == 1 else f"{ABLATION[st['row']][0]}, 2 rounds"
        add(label, st["fraction"], _miou(metrics_dir / f"student-{key}.json"))
    if 1.0 in cfg.fractions:
        for seed in cfg.seeds:
            full = _miou(metrics_dir / f"{ddep}-{subset_key(1.0, seed)}.json")
            for fraction in cfg.ablation_fractions:
                add("fully supervised (100% labels)", fraction, full)
    if not any((metrics_dir / f"student-{key}.json").is_file() for key in study_plan["students"]):
        return {}
    order = ["teacher (DDeP)", *[label for label, _ in ABLATION.values()], f"{ABLATION[SECOND_ROUND][0]}, 2 rounds",
             "fully supervised (100% labels)", "pseudo-labels, round 1", "pseudo-labels, round 2"]
    return {row: {f: _stats(rows[row].get(f, [])) for f in cfg.ablation_fractions} for row in order if row in rows}


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


def figure2(points: list[Point], cfg: StudyConfig) -> dict[str, dict[float, tuple[float, float, int]]]:
    """curve -> fraction -> (mean, std, n) of teacher val mIoU."""
    return {name: {f: _stats([p.miou for p in points if _on_curve(p, init, mode, cfg) and p.fraction == f])
                   for f in cfg.fractions}
            for name, (init, mode) in CURVES.items()}


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


def _cell(stat: tuple[float, float, int], seeds: int) -> str:
    """mean ± std over the seeds; a point with fewer seeds so far says how many; – for none."""
    mean, std, n = stat
    if n == 0:
        return "–"
    return f"{mean:.3f} ± {std:.3f}" if n >= seeds else f"{mean:.3f} ({n} of {seeds} seeds)"


def markdown(fig2: dict, sweep: dict, cfg: StudyConfig, commit: str, ablation: dict | None = None,
             progress: tuple[int, int] | None = None, length: dict | None = None,
             per_class: dict | None = None) -> str:
    """The report's tables. `progress` = (points measured, points planned): a study still
    running says so above its tables."""
    seeds = len(cfg.seeds)
    fractions = list(next(iter(fig2.values())))
    steps = ", ".join(f"{cfg.steps_for(f)} steps at {f:.0%}" for f in cfg.fractions)
    lines = []
    if progress and progress[0] < progress[1]:
        lines += [f"**Partial: {progress[0]} of {progress[1]} points measured so far** (– = not trained yet).", ""]
    lines += [(f"Teacher val mIoU, mean ± std over {seeds} seeds (labeled subset and training seed); "
               f"teachers trained {steps}; DDeP σ = {cfg.ddep_sigma:g}, DeP σ = {cfg.dep_sigma:g}. "
               f"Commit `{commit}`."), "",
              "| initialisation | " + " | ".join(f"{f:.0%} labels" for f in fractions) + " |",
              "|---|" + "---|" * len(fractions)]
    lines += [f"| {name} | " + " | ".join(_cell(row[f], seeds) for f in fractions) + " |" for name, row in fig2.items()]
    sigmas = list(next(iter(sweep.values())))
    lines += ["", f"σ sweep at {cfg.sweep_fraction:.0%} labels:", "",
              "| pretraining | " + " | ".join(f"σ = {s:g}" for s in sigmas) + " |", "|---|" + "---|" * len(sigmas)]
    lines += [f"| {name} | " + " | ".join(_cell(row[s], seeds) for s in sigmas) + " |" for name, row in sweep.items()]
    if length:
        lines += ["", (f"Length of the DDeP pretraining (σ = {cfg.ddep_sigma:g}), teacher val mIoU; the loss is the "
                       "last epoch's denoising loss, 1.0 = predicting no noise at all:"), "",
                  "| decoder pretraining | final denoising loss | "
                  + " | ".join(f"{f:.0%} labels" for f in cfg.pretrain_fractions) + " |",
                  "|---|---|" + "---|" * len(cfg.pretrain_fractions)]
        lines += [f"| {name} | {_loss_cell(row)} | "
                  + " | ".join(_cell(row[f], seeds) for f in cfg.pretrain_fractions) + " |"
                  for name, row in length.items()]
    classes = list(dict.fromkeys(c for row in (per_class or {}).values() for c in row))
    if classes:
        lines += ["", f"Per-class val IoU of the teachers above at {cfg.sweep_fraction:.0%} labels:", "",
                  "| class | " + " | ".join(per_class) + " |", "|---|" + "---|" * len(per_class)]
        # "n/a": a class no teacher of the row predicted and no val pixel holds (it is not in its mIoU).
        lines += [f"| {c} | " + " | ".join(("–" if not row else _cell(row[c], seeds) if c in row else "n/a")
                                          for row in per_class.values()) + " |" for c in classes]
    lines += ["", ("Self-training ablation (student val mIoU; pseudo-label rows: mIoU of the pseudo-labels "
                   "on the images they label):"), ""]
    if ablation:
        columns = list(next(iter(ablation.values())))
        lines += ["| | " + " | ".join(f"{f:.0%} labels" for f in columns) + " |", "|---|" + "---|" * len(columns)]
        lines += [f"| {name} | " + " | ".join(_cell(row[f], seeds) for f in columns) + " |"
                  for name, row in ablation.items()]
    else:
        lines += ["(not trained yet)"]
    return "\n".join(lines) + "\n"


def _loss_cell(row: dict) -> str:
    if "loss" not in row:
        return "n/a"  # no denoising pretraining
    return "–" if row["loss"] is None else f"{row['loss']:.3f}"


def result_files(study_plan: dict) -> list[tuple[str, str]]:
    """(study stage, its metrics file in study/metrics) for every point the plan trains, in the
    order `run` trains them: the pretraining-length check's pretrainings (a loss curve each),
    teachers cheapest first, then the ablation."""
    return ([(f"pretrain_length@{key}", f"pretrain-{key}.csv") for key in study_plan["pretrain_length"]]
            + [(f"teacher@{key}", f"{key}.json") for key in study_plan["teachers"]]
            + [(f"pseudo@{key}", f"pseudo-{key}.json") for key in study_plan["pseudo"]]
            + [(f"student@{key}", f"student-{key}.json") for key in study_plan["students"]])


def planned_points(study_plan: dict) -> int:
    return len(result_files(study_plan))


def measured_points(study_plan: dict, metrics_dir: Path) -> int:
    return sum((metrics_dir / name).is_file() for _, name in result_files(study_plan))


def write_outputs(fig2: dict, sweep: dict, out_dir: Path) -> None:
    """CSV tables for `dvc plots` (one column per curve) and the PNG figures."""
    from pipeline.infer.figures import mean_curves

    for name, table, x in (("figure2", fig2, "fraction"), ("sigma_sweep", sweep, "sigma")):
        xs = list(next(iter(table.values())))
        header = [x] + [f"{c} {part}" for c in table for part in ("mean", "std")]
        # A point not trained yet is an empty cell, which `dvc plots` and a spreadsheet read as missing.
        rows = [",".join(header)] + [",".join([f"{v:g}"] + [_csv_number(table[c][v][i]) for c in table for i in (0, 1)])
                                     for v in xs]
        write_text_atomic(out_dir / f"{name}.csv", "\n".join(rows) + "\n")
    mean_curves({c: (list(r), [m for m, _, _ in r.values()], [s for _, s, _ in r.values()]) for c, r in fig2.items()},
                "labeled fraction of the train scenes", "teacher val mIoU", "Label efficiency (DDeP paper, Fig. 2)",
                out_dir / "figure2.png", log_x=True)
    mean_curves({c: (list(r), [m for m, _, _ in r.values()], [s for _, s, _ in r.values()]) for c, r in sweep.items()},
                "σ", "teacher val mIoU", "Noise level of denoising pretraining", out_dir / "sigma_sweep.png", log_x=True)


def _csv_number(value: float) -> str:
    return "" if np.isnan(value) else f"{value:.4f}"


def update_readme(report: Path = STUDY_DIR / "report" / "report.md", readme: Path = Path("README.md")) -> None:
    if not report.is_file():
        raise ConfigError(f"{report}: missing; run `dvc repro --single-item study/dvc.yaml:report` first")
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ConfigError(f"{readme}: no {README_BEGIN} … {README_END} markers to put the study table between")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    write_text_atomic(readme, f"{head}{README_BEGIN}\n{report.read_text()}{README_END}{tail}")


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
    recorded (its metrics file is here and `recorded`) is skipped even when its models are not."""
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
        for name, result in result_files(study_plan):
            if (metrics / result).is_file() and recorded(dvc_file, name, env):
                continue
            if code := subprocess.call(["dvc", "repro", f"{dvc_file}:{name}", *dvc_args], env=env):
                return code
        return subprocess.call(["dvc", "repro", "--single-item", f"{dvc_file}:report", *dvc_args], env=env)
    finally:
        subprocess.call(["dvc", "push", "-r", STORE, *stored], env=env)


def recorded(dvc_file: Path, name: str, env: dict) -> bool:
    """Whether the study's lock holds this stage's result for its current command, params and
    inputs, even if the files it made are not here. `study/dvc.lock` and the small metrics
    files are committed, the models are not: a fresh clone keeps every finished point without
    retraining it, and trains a point again only when something it depends on changed."""
    lock_file = dvc_file.with_suffix(".lock")
    lock = yaml.safe_load(lock_file.read_text()) if lock_file.is_file() else None
    if name not in ((lock or {}).get("stages") or {}):
        return False
    status = subprocess.run(["dvc", "status", "--json", f"{dvc_file}:{name}"], env=env, capture_output=True,
                            text=True, check=True)
    changes = [change for stage in json.loads(status.stdout or "{}").values() for change in stage]
    return all(_only_missing_files(change) for change in changes)


def _only_missing_files(change) -> bool:
    """A `dvc status` entry that only says files are absent (a changed command is a bare
    string, changed params a nested dict, a changed file 'modified' or 'new')."""
    return (isinstance(change, dict) and set(change) <= {"changed deps", "changed outs"}
            and all(state in ("deleted", "not in cache") for files in change.values() for state in files.values()))

if __name__ == "__main__":
    main()
