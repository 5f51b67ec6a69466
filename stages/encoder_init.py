"""DVC stage `encoder_init`: encoder weights by supervised classification, from a file, or random."""

import argparse
from pathlib import Path

import torch

from pipeline.checkpoints import ENCODER, load_external_encoder, save_weights
from pipeline.data import read_manifest
from pipeline.models import ENCODER_PRESETS, HybridEncoder
from pipeline.raytrain import JobConfig
from pipeline.stage import stage
from pipeline.training import encoder_classify_loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="encoder weights file")
    args = parser.parse_args()
    with stage("encoder_init", ["encoder", "model"], args.prepared) as ctx:
        cfg, model = ctx.params.encoder, ctx.params.model
        if cfg.init == "supervised":
            manifest = read_manifest(args.prepared)
            job = JobConfig(train=cfg, model=model, num_classes=manifest["classify_num_classes"])
            state = ctx.train(encoder_classify_loop, job, {"classify": ([args.prepared / "classify"], ["image", "label"])},
                              inputs=[args.prepared])
            weights = {k.removeprefix("encoder."): v for k, v in state["model"].items()
                       if k.startswith("encoder.") and not k.startswith("encoder.vit.head.")}
        elif cfg.init == "file":
            weights = load_external_encoder(Path(cfg.weights_path), model.preset)
        else:
            torch.manual_seed(cfg.seed)
            weights = HybridEncoder(ENCODER_PRESETS[model.preset]).state_dict()
        save_weights(args.out, weights, ENCODER, model, None)
        ctx.summary |= {"init": cfg.init, "out": str(args.out)}


if __name__ == "__main__":
    main()
