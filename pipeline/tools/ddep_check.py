"""Does a denoising-pretrained decoder use the encoder's features? Its denoising loss on the val
images with the encoder's outputs as they are, and with one part of them taken away.

    python -m pipeline.tools.ddep_check study/models/pretrained-ddep-s0p2.pt [more.pt ...]
        [--prepared data/prepared] [--sigma 0.2] [--images 300]

Per pretrained file, the mean squared error of the predicted noise (the training loss; 1.0 is
what predicting no noise at all scores, ε having unit variance) when the decoder gets:

- `as trained`: every feature, as in pretraining;
- `tokens of another image`: the transformer's stride-16 map of the next image in the batch,
  the skips of its own (the decoder then denoises with the wrong global context);
- `tokens zeroed`: no transformer map at all;
- `skips zeroed`: no CNN skips (strides 2, 4, 8), only the transformer map;
- `nothing`: every feature zeroed (what the decoder does from its biases alone).

If `tokens zeroed` scores as well as `as trained`, the decoder denoises from the CNN skips only
and pretraining teaches it nothing about the transformer's features, which is the part of
DDeP that is meant to transfer to segmentation. Same noise for every condition (a fixed seed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

CONDITIONS = ("as trained", "tokens of another image", "tokens zeroed", "skips zeroed", "nothing")


def _edit(condition: str):
    """A forward hook on the encoder that hands the decoder `condition`'s features."""
    def hook(_module, _inputs, features: list[torch.Tensor]) -> list[torch.Tensor]:
        *skips, tokens = features
        if condition == "tokens of another image":
            return [*skips, tokens.roll(1, dims=0)]
        if condition == "tokens zeroed":
            return [*skips, torch.zeros_like(tokens)]
        if condition == "skips zeroed":
            return [*map(torch.zeros_like, skips), tokens]
        if condition == "nothing":
            return [torch.zeros_like(f) for f in features]
        return features
    return hook


@torch.no_grad()
def denoising_losses(net: torch.nn.Module, images: torch.Tensor, sigma: float, batch_size: int = 64,
                     seed: int = 0) -> dict[str, float]:
    """Condition -> mean squared error of the predicted noise over `images` (uint8 N×C×H×W),
    each image corrupted once at `sigma` with the same noise under every condition."""
    from pipeline.config.params import DecoderPretrainConfig
    from pipeline.data import augment
    from pipeline.models.denoising import corrupt

    cfg = DecoderPretrainConfig(sigma=sigma)
    clean = augment.to_model_range(augment.to_unit_float(images))
    noisy, _, target = corrupt(clean, cfg, torch.Generator().manual_seed(seed))
    net = net.eval()
    losses = {}
    for condition in CONDITIONS:
        handle = net.encoder.register_forward_hook(_edit(condition))
        try:
            total = sum(float(((net(noisy[i:i + batch_size]) - target[i:i + batch_size]) ** 2).sum())
                        for i in range(0, len(noisy), batch_size))
        finally:
            handle.remove()
        losses[condition] = total / target.numel()
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pretrained", nargs="+", type=Path, help="decoder_pretrain outputs (denoiser weights)")
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--sigma", type=float, help="noise level (default: params.yaml's decoder_pretrain.sigma)")
    parser.add_argument("--images", type=int, default=300, help="how many val images")
    args = parser.parse_args(argv)

    from pipeline.config.params import ConfigError, load_params
    from pipeline.data.shards import parquet_files
    from pipeline.infer.batch import iter_split
    from pipeline.models.checkpoints import DENOISER, CheckpointError, load_weights
    from pipeline.models.denoising import DENOISE_CHANNELS
    from pipeline.models.transunet import network_from_state

    try:
        params = load_params()
        sigma = params.decoder_pretrain.sigma if args.sigma is None else args.sigma
        weights = {path: load_weights(path, DENOISER, params.model) for path in args.pretrained}  # all, first
        if not parquet_files(args.prepared / "val"):
            raise FileNotFoundError(f"{args.prepared / 'val'}: no val split (Parquet shards) there; "
                                    "run the pipeline's prepare stage first")
        images = next(iter_split(args.prepared / "val", args.images, ["id", "image"], "val"))["image"]
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    rows = {}
    for path, state in weights.items():
        net = network_from_state(params.model, DENOISE_CHANNELS, state)
        rows[path] = denoising_losses(net, images, sigma)
    print(f"Denoising loss (MSE of the predicted noise; 1.0 = predicting none) on {len(images)} val images "
          f"of {args.prepared}, σ = {sigma:g}:\n")
    print("| pretrained | " + " | ".join(CONDITIONS) + " |")
    print("|---|" + "---|" * len(CONDITIONS))
    for path, losses in rows.items():
        print(f"| `{path}` | " + " | ".join(f"{losses[c]:.3f}" for c in CONDITIONS) + " |")


if __name__ == "__main__":
    main()
