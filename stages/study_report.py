"""DVC stage `study_report`: the label-efficiency study's and the self-training ablation's tables,
`dvc plots` CSVs and figures."""

from pathlib import Path

import mlflow
import yaml

from pipeline.data.atomic import write_text_atomic
from pipeline.orchestrate.stage_run import stage, stage_parser
from pipeline.runtime.tracking import git_commit
from pipeline.tools.study import dataset_plans, dataset_report, measured_points, planned_points


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True, help="folder of the teachers' val metrics")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md, CSVs and figures")
    args = parser.parse_args()
    with stage("study_report", ["study", "student", "data"], overrides=args.overrides) as ctx:
        cfg = ctx.params.study
        study_plan = yaml.safe_load(args.plan.read_text())
        progress = measured_points(study_plan, args.metrics), planned_points(study_plan)
        sections = [dataset_report(sub_plan, args.metrics, cfg, ctx.params.student, args.out, control,
                                   ctx.params.data.format)
                    for control, sub_plan in dataset_plans(study_plan).items()]
        partial = (f"**Partial: {progress[0]} of {progress[1]} points measured so far** (– = not trained yet).\n\n"
                   if progress[0] < progress[1] else "")
        write_text_atomic(args.out / "report.md",
                          f"{partial}Commit `{git_commit(ctx.root)}`.\n\n" + "\n".join(sections))
        mlflow.log_artifacts(str(args.out), "study")
        ctx.summary |= {"points": progress[0], "planned": progress[1]}


if __name__ == "__main__":
    main()
