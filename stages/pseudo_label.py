"""DVC stage `pseudo_label`: the teacher's hard label and confidence for every unlabeled pixel
(a Ray Data pipeline with `ray.inference_actors` replicas of the teacher)."""

import json
from pathlib import Path

import mlflow
import torch

from pipeline.data.atomic import staged, write_text_atomic
from pipeline.data.formats import palette_for
from pipeline.data.manifest import read_manifest
from pipeline.data.png import decode_png
from pipeline.data.shards import PSEUDO_SCHEMA, DataError, read_split, write_shards
from pipeline.infer.batch import pseudo_label_rows, ray_predictions
from pipeline.infer.figures import pseudo_label_grid
from pipeline.infer.metrics import segmentation_scores
from pipeline.models.checkpoints import SEGMENTER, load_weights
from pipeline.orchestrate.stage_run import stage, stage_parser

EXAMPLES = 6  # images in the pseudo-label figure


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for the pseudo-label shards")
    parser.add_argument("--unlabeled", type=Path, help="images to label (default: PREPARED/unlabeled)")
    parser.add_argument("--metrics", type=Path, help="write pseudo-label quality against held-aside masks here (JSON)")
    parser.add_argument("--figures", type=Path, help="folder for pseudo-label examples (image / label / confidence / truth)")
    args = parser.parse_args()
    unlabeled = args.unlabeled or args.prepared / "unlabeled"
    with stage("pseudo_label", ["pseudo", "model"], args.prepared, overrides=args.overrides) as ctx:
        cfg = ctx.params.pseudo
        manifest = read_manifest(args.prepared)
        teacher = load_weights(args.teacher, SEGMENTER, ctx.params.model, manifest["classes"])
        confusion = torch.zeros(manifest["num_classes"], manifest["num_classes"], dtype=torch.long)
        with ray_predictions({"teacher": teacher}, ctx.params.model, manifest["num_classes"], unlabeled,
                             ["id", "image", "mask"], cfg.batch_size, cfg.flip_tta, ctx.params.ray) as predictions, \
                staged(args.out) as tmp:
            # Ray Data starts on the first batch asked for: its actors' start leaves a core idle.
            ctx.while_job_starts(*(["matplotlib.pyplot"] if args.figures else []))
            rows = pseudo_label_rows(predictions, "teacher", confusion)
            ctx.summary["images"] = write_shards(rows, PSEUDO_SCHEMA, tmp, ctx.params.data.shard_rows)
        if confusion.sum() > 0:
            quality = segmentation_scores(confusion.numpy(), manifest["classes"])
            ctx.summary |= {"pseudo_miou": quality["miou"], "pseudo_pixel_accuracy": quality["pixel_accuracy"]}
            if args.metrics:
                write_text_atomic(args.metrics, json.dumps(quality, indent=2) + "\n")
        elif args.metrics:
            raise DataError(f"{unlabeled}: holds no masks to measure pseudo-labels against (--metrics)")
        if args.figures:
            args.figures.mkdir(parents=True, exist_ok=True)  # a DVC output even when there is nothing to draw
        if args.figures and ctx.summary["images"]:
            examples_figure(args.out, unlabeled, manifest, EXAMPLES, args.figures / "pseudo_labels.png")
            ctx.active_run_id()
            mlflow.log_artifacts(str(args.figures), "figures")


def examples_figure(pseudo: Path, unlabeled: Path, manifest: dict, count: int, path: Path) -> None:
    """The first `count` pseudo-labelled images as written, next to their held-aside masks."""
    import pyarrow.parquet as pq

    first = pq.ParquetFile(min(pseudo.glob("*.parquet")))
    pseudo_rows = next(first.iter_batches(batch_size=count)).to_pylist()
    held_aside = read_split(unlabeled, ["id", "mask"], filters=[("id", "in", [r["id"] for r in pseudo_rows])])
    masks = dict(zip(held_aside.column("id").to_pylist(), held_aside.column("mask").to_pylist()))
    pseudo_label_grid([decode_png(r["image"]) for r in pseudo_rows], [decode_png(r["pseudo_label"]) for r in pseudo_rows],
                      [decode_png(r["confidence"]) for r in pseudo_rows],
                      [None if masks.get(r["id"]) is None else decode_png(masks[r["id"]]) for r in pseudo_rows],
                      palette_for(manifest), manifest["classes"], path)


if __name__ == "__main__":
    main()
