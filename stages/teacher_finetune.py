"""DVC stage `teacher_finetune`: all weights fine-tuned with cross-entropy on the labeled split."""

from pathlib import Path

from pipeline.data.manifest import read_manifest
from pipeline.models.checkpoints import DENOISER, SEGMENTER, load_weights, save_weights
from pipeline.orchestrate.stage_run import stage, stage_parser
from pipeline.orchestrate.training import train, write_val_metrics
from pipeline.train.loop import JobConfig
from pipeline.train.recipes import Teacher


def main() -> None:
    parser = stage_parser(__doc__, training=True)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--labeled", type=Path, help="labeled split to train on (default: PREPARED/labeled)")
    parser.add_argument("--pretrained", type=Path, required=True, help="weights from decoder_pretrain")
    parser.add_argument("--out", type=Path, required=True, help="teacher weights file")
    parser.add_argument("--metrics", type=Path, help="also score the teacher on val and write its metrics JSON here")
    args = parser.parse_args()
    labeled = args.labeled or args.prepared / "labeled"
    with stage("teacher_finetune", ["teacher", "model"], args.prepared,
               overrides=args.overrides, curves=args.curves) as ctx:
        cfg, model = ctx.params.teacher, ctx.params.model
        manifest = read_manifest(args.prepared)
        job = JobConfig(train=cfg, model=model, num_classes=manifest["num_classes"],
                        init_state=load_weights(args.pretrained, DENOISER, model),
                        init_from_denoiser=True)
        state = train(ctx, Teacher(labeled=(labeled,)), job, inputs=[args.prepared, labeled, args.pretrained])
        save_weights(args.out, state["model"], SEGMENTER, model, manifest["classes"])
        ctx.summary["out"] = str(args.out)
        if args.metrics:
            write_val_metrics(ctx, state["model"], args.prepared, args.metrics)

if __name__ == "__main__":
    main()
