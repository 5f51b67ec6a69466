"""DVC stage `step_train@<step>`: an incremental step's training (FMWISS): the model before the
step, given a channel per new class, learns the new classes from the step's pseudo masks through
a plug-in teacher and keeps the old ones by distillation from itself before the step; then it is
scored on val with every class seen so far (old, new and all classes' mIoU)."""

import json
from pathlib import Path

import mlflow

from pipeline.data.atomic import write_text_atomic
from pipeline.data.incremental import classes_at
from pipeline.data.manifest import ALL_CLASSES_VAL, read_manifest
from pipeline.models.checkpoints import SEGMENTER, load_weights, save_weights, segmenter_state
from pipeline.orchestrate.stage_run import stage, stage_parser
from pipeline.orchestrate.training import train
from pipeline.train.loop import JobConfig
from pipeline.train.recipes import LearnStep


def step_scores(scores: dict, before: list[str], new: list[str]) -> dict:
    """`scores` (`ValCounts.scores`) with the mIoU of the old classes (background among them),
    of the new ones and of all, each over its classes that val shows or the model predicts."""
    iou = scores["per_class_iou"]

    def mean(classes: list[str]) -> float:
        present = [iou[c] for c in classes if c in iou]
        return sum(present) / len(present) if present else 0.0

    return {"old_miou": mean(before), "new_miou": mean(new), "all_miou": scores["miou"], **scores}


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
        from pipeline.infer.batch import evaluate_split
        from pipeline.models.transunet import network_from_state

        net = network_from_state(model, len(classes), weights).eval()
        counts, _ = evaluate_split({"model": net}, args.prepared / ALL_CLASSES_VAL, ctx.params.evaluate.batch_size,
                                   len(classes), 0, later_as_background=True)
        scores = step_scores(counts["model"].scores(classes), before, new)
        write_text_atomic(args.metrics, json.dumps(scores, indent=2) + "\n")
        mlflow.log_metrics({key: scores[key] for key in ("old_miou", "new_miou", "all_miou")})
        ctx.summary |= {"out": str(args.out), "old_miou": scores["old_miou"], "new_miou": scores["new_miou"],
                        "all_miou": scores["all_miou"]}


if __name__ == "__main__":
    main()
