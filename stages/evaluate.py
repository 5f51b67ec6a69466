"""DVC stage `evaluate`: the teacher and every self-training round's student on val — mIoU,
per-class IoU, pixel accuracy, figures (a Ray Data pipeline with `ray.inference_actors` replicas
of the models). The last round's student is `student`: it is exported and registered."""

import csv
import io
import json
import shutil
from pathlib import Path

import mlflow

from pipeline.config.params import ROUND_TEACHER
from pipeline.data.atomic import staged, write_text_atomic
from pipeline.data.formats import palette_for
from pipeline.data.manifest import read_manifest
from pipeline.infer.batch import counts_and_samples, ray_predictions
from pipeline.infer.figures import confusion_figure, per_class_bars, prediction_grid
from pipeline.models.checkpoints import SEGMENTER, load_weights
from pipeline.orchestrate.stage_run import stage, stage_parser


def per_class_csv(scores: dict, classes: list[str]) -> str:
    """One row per class, one IoU column per model (0 where a class never occurred)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["class", *scores], lineterminator="\n")
    writer.writeheader()
    for c in classes:
        writer.writerow({"class": c, **{name: round(s["per_class_iou"].get(c, 0.0), 6) for name, s in scores.items()}})
    return out.getvalue()


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--rounds", type=Path, required=True,
                        help="folder of the self-training rounds' models: teacher.pt, round1.pt, …")
    parser.add_argument("--student", type=Path, required=True, help="export the last round's student here")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON (a DVC metric)")
    parser.add_argument("--per-class", type=Path, required=True, help="per-class IoU CSV (a DVC plot)")
    parser.add_argument("--figures", type=Path, required=True)
    args = parser.parse_args()
    with stage("evaluate", ["evaluate", "model", "self_training"], args.prepared, overrides=args.overrides) as ctx:
        cfg, model, last = ctx.params.evaluate, ctx.params.model, ctx.params.self_training.last
        manifest = read_manifest(args.prepared)
        classes = manifest["classes"]
        files = {name: args.rounds / f"{name}.pt" for name in [ROUND_TEACHER, *ctx.params.self_training.rounds]}
        models = {("student" if name == last else name): load_weights(path, SEGMENTER, model, classes)
                  for name, path in files.items()}
        with ray_predictions(models, model, len(classes), args.prepared / "val", ["id", "image", "mask"],
                             cfg.batch_size, False, ctx.params.ray) as predictions:
            # Ray Data starts on the first batch asked for: its actors' start leaves a core idle.
            ctx.while_job_starts("matplotlib.pyplot", *(["pipeline.infer.registry"] if cfg.registered_model else []))
            counts, samples = counts_and_samples(predictions, list(models), len(classes), cfg.grid_images)
        scores = {name: c.scores(classes) for name, c in counts.items()}
        write_text_atomic(args.metrics, json.dumps(scores, indent=2) + "\n")
        write_text_atomic(args.per_class, per_class_csv(scores, classes))
        for name, c in counts.items():
            confusion_figure(c.confusion.numpy(), classes, f"{name} (val mIoU {scores[name]['miou']:.3f})",
                             args.figures / f"confusion_{name}.png")
        per_class_bars(scores, classes, args.figures / "per_class_iou.png")
        prediction_grid(samples["image"], {"truth": samples["mask"], **{n: samples[n] for n in models}},
                        palette_for(manifest), classes, args.figures / "predictions.png")
        ctx.active_run_id()
        mlflow.log_artifacts(str(args.figures), "figures")
        mlflow.log_artifact(str(args.per_class))
        for name, s in scores.items():
            mlflow.log_metrics({f"{name}_miou": s["miou"], f"{name}_pixel_accuracy": s["pixel_accuracy"],
                                f"{name}_boundary_f1": s["boundary_f1"]})
            mlflow.log_metrics({f"{name}_iou.{c}": v for c, v in s["per_class_iou"].items()})
            ctx.summary[f"{name}_miou"] = s["miou"]
        with staged(args.student) as tmp:
            shutil.copyfile(files[last], tmp)
        if cfg.registered_model:
            from pipeline.infer.registry import register_segmenter

            version, champion = register_segmenter(args.student, manifest["image_size"], classes,
                                                   cfg.registered_model, scores["student"]["miou"],
                                                   manifest["format"])
            ctx.summary |= {"model": f"models:/{cfg.registered_model}/{version}", "champion": champion}


if __name__ == "__main__":
    main()
