"""DVC stage `tag_classifier@<step>`: the classifier of an incremental step's new classes whose
maps are the step's initial pseudo masks. Locally, a multi-label classifier trained on the step's
images' tags over the encoder of the model before the step (its class activation maps stand in
for CLIP's scores); where `incremental.masks.clip` names a CLIP, CLIP's zero-shot classifier: its
text embeddings of the class names' prompts, which needs no training."""

from pathlib import Path

from pipeline.data.atomic import write_text_atomic
from pipeline.data.incremental import classes_at
from pipeline.data.manifest import read_manifest, step_split
from pipeline.models.checkpoints import (
    CLIP_TEXT,
    SEGMENTER,
    TAG_CLASSIFIER,
    encoder_weights,
    load_weights,
    save_weights,
)
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
        cfg, model, clip = ctx.params.incremental.classifier, ctx.params.model, ctx.params.incremental.masks.clip
        before, new = classes_at(read_manifest(args.prepared), args.step)
        ctx.summary |= {"out": str(args.out), "classes": len(new)}
        if clip:
            from pipeline.models.foundation import clip_text, load_clip

            save_weights(args.out, {"text": clip_text(*load_clip(clip), new)}, CLIP_TEXT, model, new)
            if args.curves:  # DVC's plot of a classifier that trained for no epoch
                write_text_atomic(args.curves, "epoch\n")
            return
        previous = load_weights(args.previous, SEGMENTER, model, before)
        job = JobConfig(train=cfg, model=model, num_classes=len(new), classes=tuple(new),
                        init_state=encoder_weights(previous))
        tagged = args.prepared / step_split(args.step)
        state = train(ctx, TagClassify(tagged=(tagged,), first_class=len(before)), job,
                      inputs=[args.prepared, tagged, args.previous])
        save_weights(args.out, state["model"], TAG_CLASSIFIER, model, new)


if __name__ == "__main__":
    main()
