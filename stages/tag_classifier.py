"""DVC stage `tag_classifier@<step>`: a multi-label classifier of an incremental step's new
classes, trained on its images' tags over the encoder of the model before the step; its class
activation maps are the step's initial pseudo masks (FMWISS's, with CLIP stood in for)."""

from pathlib import Path

from pipeline.data.incremental import classes_at
from pipeline.data.manifest import read_manifest, step_split
from pipeline.models.checkpoints import SEGMENTER, TAG_CLASSIFIER, encoder_weights, load_weights, save_weights
from pipeline.orchestrate.stage_run import stage, stage_parser
from pipeline.orchestrate.training import train
from pipeline.train.loop import JobConfig
from pipeline.train.recipes import TagClassify


def main() -> None:
    parser = stage_parser(__doc__, training=True)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--step", required=True, help="the step's name in params' incremental.steps")
    parser.add_argument("--previous", type=Path, required=True, help="weights of the model before the step")
    parser.add_argument("--out", type=Path, required=True, help="tag classifier weights file")
    args = parser.parse_args()
    with stage("tag_classifier", ["incremental", "model"], args.prepared,
               overrides=args.overrides, curves=args.curves) as ctx:
        cfg, model = ctx.params.incremental.classifier, ctx.params.model
        before, new = classes_at(read_manifest(args.prepared), args.step)
        previous = load_weights(args.previous, SEGMENTER, model, before)
        job = JobConfig(train=cfg, model=model, num_classes=len(new), classes=tuple(new),
                        init_state=encoder_weights(previous))
        tagged = args.prepared / step_split(args.step)
        state = train(ctx, TagClassify(tagged=(tagged,), first_class=len(before)), job,
                      inputs=[args.prepared, tagged, args.previous])
        save_weights(args.out, state["model"], TAG_CLASSIFIER, model, new)
        ctx.summary |= {"out": str(args.out), "classes": len(new)}


if __name__ == "__main__":
    main()
