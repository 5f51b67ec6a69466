"""DVC stage `decoder_pretrain`: DDeP — the frozen encoder's decoder learns to predict the noise."""

import argparse
from pathlib import Path

import mlflow
import torch

from pipeline.checkpoints import DENOISER, ENCODER, load_weights, save_weights
from pipeline.data import read_manifest
from pipeline.figures import denoising_triplets
from pipeline.inference import iter_split
from pipeline.raytrain import JobConfig
from pipeline.stage import stage
from pipeline.models import DENOISE_CHANNELS
from pipeline.training import build_network, decoder_pretrain_loop

TRIPLETS = 4


def log_triplets(net, prepared: Path, sigma: float, path: Path) -> None:
    from pipeline import augment
    from pipeline.denoising import noisy_input

    images = next(iter_split(prepared / "labeled", TRIPLETS, ["id", "image"], "triplets"))["image"]
    clean = augment.to_model_range(augment.to_unit_float(images))
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    noisy = noisy_input(clean, sigma, noise)
    with torch.no_grad():
        predicted = net.eval()(noisy)
    denoising_triplets(clean, noisy, predicted, noise, path)
    mlflow.log_artifact(str(path), "figures")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--encoder", type=Path, required=True, help="encoder weights from encoder_init")
    parser.add_argument("--out", type=Path, required=True, help="encoder+decoder weights file")
    parser.add_argument("--figures", type=Path, required=True)
    args = parser.parse_args()
    with stage("decoder_pretrain", ["ddep", "model"], args.prepared) as ctx:
        cfg, model = ctx.params.ddep, ctx.params.model
        manifest = read_manifest(args.prepared)
        encoder = load_weights(args.encoder, ENCODER, model)
        job = JobConfig(train=cfg, model=model, num_classes=manifest["num_classes"], init_state=encoder)
        images = [args.prepared / "labeled"] + ([args.prepared / "unlabeled"] if manifest["counts"]["unlabeled"] else [])
        state = ctx.train(decoder_pretrain_loop, job, {"images": (images, ["image"])},
                          inputs=[args.prepared, args.encoder])
        save_weights(args.out, state["model"], DENOISER, model, None)
        net = build_network(model, DENOISE_CHANNELS)
        net.load_state_dict(state["model"])
        log_triplets(net, args.prepared, cfg.sigma, args.figures / "denoising_triplets.png")
        ctx.summary["out"] = str(args.out)


if __name__ == "__main__":
    main()
