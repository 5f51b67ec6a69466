"""DVC stage `encoder_init`: encoder weights by supervised classification, DenseCL on the
unlabeled images, from a file, or random."""

from pathlib import Path

import torch

from pipeline.checkpoints import ENCODER, encoder_weights, load_external_encoder, save_weights
from pipeline.data import pretraining_images, read_manifest
from pipeline.raytrain import JobConfig
from pipeline.stage import stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__, training=True)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="encoder weights file")
    args = parser.parse_args()
    with stage("encoder_init", ["encoder", "model"], args.prepared,
               overrides=args.overrides, curves=args.curves, plain=args.plain) as ctx:
        cfg, model = ctx.params.encoder, ctx.params.model
        manifest = read_manifest(args.prepared)
        if cfg.init == "supervised":
            job = JobConfig(train=cfg, model=model, num_classes=manifest["classify_num_classes"])
            state = ctx.train("encoder_classify", job, {"classify": ([args.prepared / "classify"], ["image", "label"])},
                              inputs=[args.prepared])
            weights = encoder_weights(state["model"])
        elif cfg.init == "densecl":
            job = JobConfig(train=cfg, model=model, num_classes=manifest["num_classes"])
            state = ctx.train("encoder_densecl", job, {"images": (pretraining_images(args.prepared, manifest), ["image"])},
                              inputs=[args.prepared])
            weights = encoder_weights(state["model"])
        elif cfg.init == "file":
            weights = load_external_encoder(Path(cfg.weights_path), model.preset)
        else:
            from pipeline.models import ENCODER_PRESETS, HybridEncoder

            torch.manual_seed(cfg.seed)
            weights = HybridEncoder(ENCODER_PRESETS[model.preset]).state_dict()
        save_weights(args.out, weights, ENCODER, model, None)
        ctx.summary |= {"init": cfg.init, "out": str(args.out)}


if __name__ == "__main__":
    main()
