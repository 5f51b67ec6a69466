"""DVC stage `student_train`: self-training on labeled + strongly augmented pseudo-labeled images."""

from pathlib import Path

from pipeline.data.manifest import read_manifest
from pipeline.models.checkpoints import DENOISER, SEGMENTER, load_weights, save_weights, segmenter_state
from pipeline.models.dsbn import main_bn_state
from pipeline.orchestrate.stage_run import stage, stage_parser
from pipeline.orchestrate.training import train, write_val_metrics
from pipeline.train.loop import JobConfig
from pipeline.train.recipes import Student


def main() -> None:
    parser = stage_parser(__doc__, training=True)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--pseudo", type=Path, required=True, help="pseudo-label shards")
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--pretrained", type=Path, required=True, help="weights from decoder_pretrain")
    parser.add_argument("--out", type=Path, required=True, help="student weights file")
    parser.add_argument("--labeled", type=Path, help="labeled split to train on (default: PREPARED/labeled)")
    parser.add_argument("--metrics", type=Path, help="also score the student on val and write its metrics JSON here")
    args = parser.parse_args()
    labeled = args.labeled or args.prepared / "labeled"
    with stage("student_train", ["student", "model"], args.prepared,
               overrides=args.overrides, curves=args.curves) as ctx:
        cfg, model = ctx.params.student, ctx.params.model
        manifest = read_manifest(args.prepared)
        classes = manifest["classes"]
        from_denoiser = cfg.init != "teacher"
        init = (load_weights(args.pretrained, DENOISER, model) if from_denoiser
                else load_weights(args.teacher, SEGMENTER, model, classes))
        job = JobConfig(train=cfg, model=model, num_classes=len(classes), classes=tuple(classes), init_state=init,
                        init_from_denoiser=from_denoiser)
        state = train(ctx, Student(labeled=(labeled,), pseudo=(args.pseudo,)), job,
                          inputs=[args.prepared, labeled, args.pseudo, args.teacher, args.pretrained])
        weights = main_bn_state(segmenter_state(state["model"]))
        save_weights(args.out, weights, SEGMENTER, model, classes)
        ctx.summary["out"] = str(args.out)
        if args.metrics:
            write_val_metrics(ctx, weights, args.prepared, args.metrics)


if __name__ == "__main__":
    main()
