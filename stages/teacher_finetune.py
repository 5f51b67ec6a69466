"""DVC stage `teacher_finetune`: all weights fine-tuned with cross-entropy on the labeled split."""

import argparse
from pathlib import Path

from pipeline.checkpoints import DENOISER, SEGMENTER, load_weights, save_weights
from pipeline.data import read_manifest
from pipeline.models import DENOISE_CHANNELS
from pipeline.raytrain import JobConfig
from pipeline.stage import stage
from pipeline.training import teacher_loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--pretrained", type=Path, required=True, help="weights from decoder_pretrain")
    parser.add_argument("--out", type=Path, required=True, help="teacher weights file")
    args = parser.parse_args()
    with stage("teacher_finetune", ["teacher", "model"], args.prepared) as ctx:
        cfg, model = ctx.params.teacher, ctx.params.model
        manifest = read_manifest(args.prepared)
        job = JobConfig(train=cfg, model=model, num_classes=manifest["num_classes"],
                        init_state=load_weights(args.pretrained, DENOISER, model),
                        init_out_channels=DENOISE_CHANNELS)
        state = ctx.train(teacher_loop, job, {"labeled": ([args.prepared / "labeled"], ["image", "mask"])},
                          inputs=[args.prepared, args.pretrained])
        save_weights(args.out, state["model"], SEGMENTER, model, manifest["classes"])
        ctx.summary["out"] = str(args.out)


if __name__ == "__main__":
    main()
