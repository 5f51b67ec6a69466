"""The pipeline's student recipe, chosen on the tuning split by forward selection.

    python -m pipeline.tools.recipe_choice           # every trial (about 40 minutes here), then the table
    python -m pipeline.tools.recipe_choice readme    # reports/recipe_choice.json's table into README.md

From the plain student (cross-entropy on the teacher's pseudo-labels, every switch off), each
piece of the study's ablation is tried in its order on top of the pieces kept so far, and kept
if the student scores higher with it than without it. Scores are the tuning split's val
(`data.tuning`: its val scenes on two train photos that its train scenes do not use), never
val's. Every trial is the default pipeline with that recipe and one self-training round, its
students at the study's ablation length (`study.ablation_student_epochs` ×
`study.student_steps_per_epoch`), run as a fresh clone runs it, all in one git worktree of
HEAD: the teacher and its pseudo-labels are made once and each trial retrains only its student
(DVC's cache). The recipe kept is then run with the default's rounds, for the record: the
rounds and the pipeline's student steps are the budget curve's choice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.compose import compose, render
from pipeline.config.ablation import OFF, PIECES, student_overrides
from pipeline.config.params import ConfigError, Params
from pipeline.data.atomic import write_text_atomic
from pipeline.tools.readme_block import write_block

CHOICE_JSON = Path("reports/recipe_choice.json")
README_BEGIN, README_END = "<!-- recipe-choice:begin -->", "<!-- recipe-choice:end -->"
PLAIN = "student, plain CE"


def overrides(switches: dict, rounds: int, default: Params) -> list[str]:
    """Hydra overrides of the default composition: the tuning split, the student's switches at
    the study's ablation length, the default's rounds cut to the first `rounds`."""
    names = list(default.self_training.rounds)
    if not 1 <= rounds <= len(names):
        raise ConfigError(f"rounds: expected 1 to {len(names)} (the default's), got {rounds}")
    return ["data.tuning=true",
            *student_overrides({**switches, "epochs": default.study.ablation_student_epochs,
                                "steps_per_epoch": default.study.student_steps_per_epoch}),
            *(f"~self_training.rounds.{name}" for name in names[rounds:])]


Score = Callable[[dict, int], dict]  # (switches, rounds) -> {"teacher_miou", "student_miou"}


def forward_selection(score: Score, rounds: int) -> list[dict]:
    """The trials, in the order they ran: the plain student, each piece on top of the pieces kept
    before it (`kept`: whether it beat the best score so far), then the kept recipe at `rounds`."""
    kept: dict = {}
    trials = [{"tried": PLAIN, "on_top_of": [], "switches": dict(OFF), "rounds": 1, **score(dict(OFF), 1), "kept": True}]
    best, pieces_kept = trials[0]["student_miou"], []
    for _, label, added in PIECES:
        switches = {**OFF, **kept, **added}
        trial = {"tried": label, "on_top_of": list(pieces_kept), "switches": switches, "rounds": 1, **score(switches, 1)}
        trial["kept"] = trial["student_miou"] > best
        if trial["kept"]:
            kept, best = {**kept, **added}, trial["student_miou"]
            pieces_kept.append(label)
        trials.append(trial)
    recipe = {**OFF, **kept}
    trials.append({"tried": f"the kept recipe, {rounds} rounds", "on_top_of": pieces_kept, "switches": recipe,
                   "rounds": rounds, **score(recipe, rounds), "kept": True})
    return trials


def chosen_switches(choice: dict) -> dict:
    """The student switches the selection kept: the last trial's."""
    return choice["trials"][-1]["switches"]


def measure_all(commit: str, env: dict) -> list[dict]:
    """The forward selection, each trial the default pipeline in one worktree of `commit`."""
    from pipeline.run import dvc_paths
    from pipeline.tools.bench import in_worktree, timed

    def run(tree: Path, tree_env: dict) -> list[dict]:
        conf = (tree / "conf").resolve()
        default = compose([], conf)

        def score(switches: dict, rounds: int) -> dict:
            chosen = overrides(switches, rounds, default)
            print(f"trial: {' '.join(chosen)}", flush=True)
            write_text_atomic(tree / "params.yaml", render(compose(chosen, conf), chosen))
            seconds = timed([sys.executable, "-m", "pipeline.run"], tree_env, cwd=tree)
            metrics = json.loads((tree / dvc_paths(tree)["metrics"]).read_text())
            return {"pipeline_s": seconds, "teacher_miou": metrics["teacher"]["miou"],
                    "student_miou": metrics["student"]["miou"]}

        return forward_selection(score, len(default.self_training.rounds))

    return in_worktree(commit, env, run)


def markdown(choice: dict) -> str:
    trials = choice["trials"]
    lines = [(f"Measured {choice['date']} at commit `{choice['commit'][:10]}` on {choice['machine']} by "
              "`python -m pipeline.tools.recipe_choice` (`reports/recipe_choice.json`): each student is the "
              f"default pipeline with that recipe, scored on the tuning split (one seed; teacher "
              f"{trials[0]['teacher_miou']:.3f})."), "",
             "| tried | on top of | rounds | student mIoU | against the best before it | kept |",
             "|---|---|---:|---:|---:|---|"]
    best = trials[0]["student_miou"]
    for t in trials:
        base = ", ".join(p.removeprefix("+ ") for p in t["on_top_of"]) or "plain CE"
        against = f"{t['student_miou'] - best:+.4f}" if t["rounds"] == 1 and t["tried"] != PLAIN else ""
        lines.append(f"| {t['tried']} | {base if t['tried'] != PLAIN else ''} | {t['rounds']} | "
                     f"{t['student_miou']:.3f} | {against} | {'yes' if t['kept'] else 'no'} |")
        if t["kept"] and t["rounds"] == 1:
            best = t["student_miou"]
    recipe = ", ".join(p.removeprefix("+ ") for p in trials[-1]["on_top_of"]) or "none"
    lines += ["", (f"Kept, the pipeline's student recipe: plain CE + {recipe}. One seed's student differs "
                   "from another's by about 0.01, so a piece kept or dropped by less than that is a tie "
                   "this selection broke by chance.")]
    return "\n".join(lines)


def write_readme(choice: dict, readme: Path = Path("README.md")) -> None:
    write_block(readme, README_BEGIN, README_END, markdown(choice))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="run", choices=["run", "readme"])
    args = parser.parse_args(argv)
    if args.command == "readme":
        if not CHOICE_JSON.is_file():
            sys.exit(f"error: {CHOICE_JSON}: missing; run `python -m pipeline.tools.recipe_choice` first")
        write_readme(json.loads(CHOICE_JSON.read_text()))
        return
    from pipeline.tools.bench import machine, resolve_commit

    commit = resolve_commit("HEAD")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    choice = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": machine(),
              "trials": measure_all(commit, env)}
    write_text_atomic(CHOICE_JSON, json.dumps(choice, indent=2) + "\n")
    print(markdown(choice))


if __name__ == "__main__":
    main()
