"""DVC stage `pseudo_masks@<step>`: the pseudo masks of an incremental step's new classes on its
tagged images (a Ray Data pipeline with `ray.inference_actors` replicas): the tag classifier's
activation maps (or CLIP's scores, `incremental.masks.clip`), grown from seeds by the
denoising-pretrained network's features (or DINO's attention, `incremental.masks.dino`), fused:
FMWISS's initial mask, seeds guidance and union."""

import json
from pathlib import Path

import numpy as np

from pipeline.data.atomic import staged, write_text_atomic
from pipeline.data.incremental import classes_at
from pipeline.data.manifest import read_manifest, step_split
from pipeline.data.shards import STEP_MASKS_SCHEMA, write_shards
from pipeline.infer.batch import ray_map
from pipeline.infer.step_masks import StepMaskReplica, foundation_models, mask_rows, mask_scores
from pipeline.models.checkpoints import CLIP_TEXT, DENOISER, TAG_CLASSIFIER, load_weights
from pipeline.orchestrate.stage_run import stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--step", required=True, help="the step's name in params' incremental.steps")
    parser.add_argument("--classifier", type=Path, required=True,
                        help="the step's tag classifier (tag_classifier: trained, or CLIP's text embeddings)")
    parser.add_argument("--features", type=Path, required=True, help="the denoising pretrained network (decoder_pretrain)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the pseudo-mask shards")
    parser.add_argument("--metrics", type=Path, help="write the masks' IoU with their held-aside masks here (JSON)")
    args = parser.parse_args()
    with stage("pseudo_masks", ["incremental", "model"], args.prepared, overrides=args.overrides) as ctx:
        cfg, model, ray_cfg = ctx.params.incremental.masks, ctx.params.model, ctx.params.ray
        before, new = classes_at(read_manifest(args.prepared), args.step)
        classifier = load_weights(args.classifier, CLIP_TEXT if cfg.clip else TAG_CLASSIFIER, model, new)
        states = {"classifier": classifier, **foundation_models(cfg, classifier.get("text"))}
        if "dino" not in states:  # DINO's attention stands where the denoising network's features would
            states["features"] = load_weights(args.features, DENOISER, model)
        overlap = np.zeros((2, len(new), 2), dtype=np.int64)
        tagged = args.prepared / step_split(args.step)
        with ray_map(StepMaskReplica, {"states": states, "model": model, "classes": new, "first_class": len(before),
                                       "cfg": cfg, "threads": ray_cfg.cpus_per_worker,
                                       "use_gpu": ray_cfg.use_gpu},
                     tagged, ["id", "image", "mask", "tags"], cfg.batch_size, ray_cfg,
                     by_reference=("states",)) as batches, staged(args.out) as tmp:
            ctx.while_job_starts()
            rows = mask_rows(batches, len(before), len(new), overlap)
            ctx.summary["images"] = write_shards(rows, STEP_MASKS_SCHEMA, tmp, ctx.params.data.shard_rows)
        # Scored where the step's masks were held aside (built-in and benchmark data; a folder's
        # tagged images have none, and their metrics file says so).
        scores = mask_scores(overlap, new) if overlap.sum() > 0 else {}
        if scores:
            ctx.summary |= {"initial_miou": scores["initial"]["miou"], "fused_miou": scores["fused"]["miou"]}
        if args.metrics:
            write_text_atomic(args.metrics, json.dumps({"held_aside_masks": bool(scores), **scores}, indent=2) + "\n")


if __name__ == "__main__":
    main()
