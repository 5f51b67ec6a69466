"""DVC stage `encoder_init`: the encoder's starting weights — the shipped stand-in encoder
(supervised on letters, as the paper's on ImageNet), the preset's ImageNet weights through timm,
DenseCL on the train images, a file, or random."""

from pathlib import Path

import torch

from pipeline.config.params import standin_encoder
from pipeline.config.presets import ENCODER_PRESETS
from pipeline.data.manifest import pretraining_images, read_manifest
from pipeline.models.checkpoints import (
    ENCODER,
    encoder_weights,
    load_external_encoder,
    load_hub_encoder,
    load_weights,
    save_weights,
)
from pipeline.orchestrate.stage_run import stage, stage_parser
from pipeline.orchestrate.training import train
from pipeline.train.loop import JobConfig
from pipeline.train.recipes import EncoderDenseCL


def main() -> None:
    parser = stage_parser(__doc__, training=True)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="encoder weights file")
    args = parser.parse_args()
    with stage("encoder_init", ["encoder", "model"], args.prepared,
               overrides=args.overrides, curves=args.curves) as ctx:
        cfg, model = ctx.params.encoder, ctx.params.model
        if cfg.init == "supervised":
            source = standin_encoder(model.preset)
            weights = load_weights(source, ENCODER, model)
            ctx.summary["from"] = str(source)
        elif cfg.init == "densecl":
            manifest = read_manifest(args.prepared)
            job = JobConfig(train=cfg, model=model, num_classes=manifest["num_classes"])
            state = train(ctx, EncoderDenseCL(images=tuple(pretraining_images(args.prepared, manifest))), job,
                              inputs=[args.prepared])
            weights = encoder_weights(state["model"])
        elif cfg.init == "timm":
            weights = load_hub_encoder(model.preset, cfg.release(model.preset), cfg.weights_path)
            ctx.summary["from"] = cfg.weights_path or cfg.release(model.preset)
        elif cfg.init == "file":
            weights = load_external_encoder(Path(cfg.weights_path), model.preset)
        else:
            from pipeline.models.transunet import HybridEncoder

            torch.manual_seed(cfg.seed)
            weights = HybridEncoder(ENCODER_PRESETS[model.preset]).state_dict()
        save_weights(args.out, weights, ENCODER, model, None)
        ctx.summary |= {"init": cfg.init, "out": str(args.out)}


if __name__ == "__main__":
    main()
