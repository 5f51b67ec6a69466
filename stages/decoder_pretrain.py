"""DVC stage `decoder_pretrain`: denoising pretraining — DDeP (decoder over the frozen encoder),
DeP (the whole network), or none (the decoder stays randomly initialised)."""

from pathlib import Path

import torch

from pipeline.config.params import DecoderPretrainConfig
from pipeline.data.manifest import pretraining_images, read_manifest
from pipeline.infer.figures import denoising_triplets
from pipeline.models.checkpoints import DENOISER, ENCODER, load_weights, save_weights
from pipeline.models.denoising import DENOISE_CHANNELS, corrupt
from pipeline.orchestrate.stage_run import stage, stage_parser
from pipeline.orchestrate.training import train
from pipeline.train.loop import JobConfig
from pipeline.train.recipes import DecoderPretrain

TRIPLETS = 4


def log_triplets(net, prepared: Path, cfg: DecoderPretrainConfig, path: Path) -> None:
    from pipeline.data import augment
    from pipeline.infer.batch import iter_split

    images = next(iter_split(prepared / "labeled", TRIPLETS, ["id", "image"], "triplets"))["image"]
    clean = augment.to_model_range(augment.to_unit_float(images))
    noisy, sigma, target = corrupt(clean, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        predicted = net.eval()(noisy, sigma if cfg.sigma_conditioning else None)
    denoising_triplets(clean, noisy, predicted, target, path)
    import mlflow

    mlflow.log_artifact(str(path), "figures")


def main() -> None:
    parser = stage_parser(__doc__, training=True)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--encoder", type=Path, required=True, help="encoder weights from encoder_init")
    parser.add_argument("--out", type=Path, required=True, help="encoder+decoder weights file")
    parser.add_argument("--figures", type=Path, required=True)
    args = parser.parse_args()
    with stage("decoder_pretrain", ["decoder_pretrain", "model"], args.prepared,
               overrides=args.overrides, curves=args.curves) as ctx:
        cfg, model = ctx.params.decoder_pretrain, ctx.params.model
        manifest = read_manifest(args.prepared)
        encoder = load_weights(args.encoder, ENCODER, model)
        if cfg.mode != "none":
            job = JobConfig(train=cfg, model=model, num_classes=manifest["num_classes"], init_state=encoder)
            state = train(ctx, DecoderPretrain(images=tuple(pretraining_images(args.prepared, manifest))), job,
                          inputs=[args.prepared, args.encoder],
                          imports=("pipeline.models.transunet", "matplotlib.pyplot"))  # for the figures after it
        from pipeline.models.transunet import build_network

        torch.manual_seed(cfg.seed)  # mode none: this is the decoder the teacher starts from
        net = build_network(model, DENOISE_CHANNELS, cfg.sigma_conditioning)
        if cfg.mode == "none":
            net.encoder.load_state_dict(encoder)
        else:
            net.load_state_dict(state["model"])
            log_triplets(net, args.prepared, cfg, args.figures / "denoising_triplets.png")
        args.figures.mkdir(parents=True, exist_ok=True)  # a DVC output even when nothing is drawn
        save_weights(args.out, net.without_noise_level(), DENOISER, model, None)
        ctx.summary |= {"mode": cfg.mode, "out": str(args.out)}


if __name__ == "__main__":
    main()
