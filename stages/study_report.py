"""DVC stage `study_report`: the label-efficiency study's and the self-training ablation's tables,
`dvc plots` CSVs and figures."""

from pathlib import Path

import mlflow
import yaml

from pipeline.data.atomic import write_text_atomic
from pipeline.orchestrate.stage_run import stage, stage_parser
from pipeline.runtime.tracking import git_commit
from pipeline.tools.study import report


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True, help="folder of the teachers' val metrics")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md, CSVs and figures")
    args = parser.parse_args()
    with stage("study_report", ["study", "student", "self_training", "data"], overrides=args.overrides) as ctx:
        cfg = ctx.params.study
        study_plan = yaml.safe_load(args.plan.read_text())
        done = report(study_plan, args.metrics, cfg, ctx.params.student, len(ctx.params.self_training.rounds),
                      args.out, ctx.params.data.format, git_commit(ctx.root))
        write_text_atomic(args.out / "report.md", done.text)
        ctx.active_run_id()
        mlflow.log_artifacts(str(args.out), "study")
        ctx.summary |= {"points": done.measured, "planned": done.planned}


if __name__ == "__main__":
    main()
