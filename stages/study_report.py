"""DVC stage `study_report`: the label-efficiency study's and the self-training ablation's tables,
`dvc plots` CSVs and figures."""

from pathlib import Path

import mlflow
import yaml

from pipeline.data.atomic import write_text_atomic
from pipeline.orchestrate.stage_run import stage, stage_parser
from pipeline.runtime.tracking import git_commit
from pipeline.tools.study import (
    ablation_table,
    collect,
    figure2,
    markdown,
    measured_points,
    per_class_table,
    planned_points,
    pretrain_length_table,
    sigma_sweep,
    write_outputs,
)


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True, help="folder of the teachers' val metrics")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md, CSVs and figures")
    args = parser.parse_args()
    with stage("study_report", ["study"], overrides=args.overrides) as ctx:
        cfg = ctx.params.study
        study_plan = yaml.safe_load(args.plan.read_text())
        points = collect(study_plan, args.metrics)
        fig2, sweep = figure2(points, cfg), sigma_sweep(points, cfg)
        ablation = ablation_table(study_plan, args.metrics, cfg)
        write_outputs(fig2, sweep, args.out)
        progress = measured_points(study_plan, args.metrics), planned_points(study_plan)
        length = pretrain_length_table(points, study_plan, args.metrics, cfg)
        write_text_atomic(args.out / "report.md",
                          markdown(fig2, sweep, cfg, git_commit(ctx.root), ablation, progress, length,
                                   per_class_table(points, cfg)))
        mlflow.log_artifacts(str(args.out), "study")
        ctx.summary |= {"points": progress[0], "planned": progress[1],
                        **{f"{name} {f:g}": row[f][0] for name, row in fig2.items() for f in (min(row),)
                           if row[f][2]}}


if __name__ == "__main__":
    main()
