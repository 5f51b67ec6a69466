"""DVC stage `step_train@<step>`: an incremental step's training (FMWISS): the model before the
step, given a channel per new class, learns the new classes from the step's pseudo masks through
a plug-in teacher and keeps the old ones by distillation from itself before the step; then it is
scored on val with every class seen so far (old, new and all classes' mIoU)."""

from pathlib import Path

from pipeline.data.incremental import classes_at
from pipeline.data.manifest import ALL_CLASSES_VAL, read_manifest
from pipeline.models.checkpoints import SEGMENTER, load_weights, save_weights, segmenter_state
from pipeline.orchestrate.stage_run import stage, stage_parser
from pipeline.orchestrate.training import train, write_val_metrics
from pipeline.train.loop import JobConfig
from pipeline.train.recipes import LearnStep


def main() -> None:
    parser = stage_parser(__doc__, training=True)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--step", required=True, help="the step's name in params' incremental.steps")
    parser.add_argument("--masks", type=Path, required=True, help="the step's pseudo-mask shards (pseudo_masks)")
    parser.add_argument("--previous", type=Path, required=True, help="weights of the model before the step")
    parser.add_argument("--out", type=Path, required=True, help="the step's model weights file")
    parser.add_argument("--metrics", type=Path, required=True, help="its scores on val, JSON (a DVC metric)")
    args = parser.parse_args()
    with stage("step_train", ["incremental", "model", "evaluate"], args.prepared,
               overrides=args.overrides, curves=args.curves) as ctx:
        cfg, model = ctx.params.incremental.training, ctx.params.model
        before, new = classes_at(read_manifest(args.prepared), args.step)
        classes = before + new
        job = JobConfig(train=cfg, model=model, num_classes=len(classes), classes=tuple(classes),
                        init_state=load_weights(args.previous, SEGMENTER, model, before))
        labeled = args.prepared / "labeled"
        state = train(ctx, LearnStep(masks=(args.masks,), labeled=(labeled,), first_class=len(before)), job,
                      inputs=[args.prepared, args.masks, labeled, args.previous],
                      imports=("pipeline.infer.batch", "pipeline.models.transunet"))
        weights = segmenter_state(state["model"])  # the plug-in teacher is dropped
        save_weights(args.out, weights, SEGMENTER, model, classes)
        ctx.summary["out"] = str(args.out)
        # Old classes' mIoU counts background among them; classes of later steps are background.
        write_val_metrics(ctx, weights, args.prepared, args.metrics, split=ALL_CLASSES_VAL, classes=classes,
                          later_as_background=True, groups={"old": before, "new": new, "all": classes})


if __name__ == "__main__":
    main()
