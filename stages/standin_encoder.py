"""DVC stage `standin_encoder` (encoders/dvc.yaml): the stand-in encoder that `encoder.init: supervised`
starts from on every dataset, as the paper's encoder starts from ImageNet: a classifier of
letters on photos (`pipeline.data.glyphs`), another labeled source than any segmentation task.
Trained once and shipped in encoders/weights/; `make standin` remakes it."""

import tempfile
from pathlib import Path

from pipeline.data import glyphs
from pipeline.models.checkpoints import ENCODER, encoder_weights, save_weights
from pipeline.orchestrate.stage_run import stage, stage_parser
from pipeline.orchestrate.training import train
from pipeline.train.loop import JobConfig
from pipeline.train.recipes import EncoderClassify


def main() -> None:
    parser = stage_parser(__doc__, training=True)
    parser.add_argument("--params", default="encoders/params.yaml",
                        help="its training schedule (`encoder`) and preset (`model.preset`)")
    parser.add_argument("--letters", type=int, required=True, help="how many labeled letters it learns from")
    parser.add_argument("--size", type=int, required=True, help="their side in pixels")
    parser.add_argument("--out", type=Path, required=True, help="encoder weights file")
    args = parser.parse_args()
    with stage("standin_encoder", ["encoder", "model"], params_file=args.params,
               overrides=args.overrides, curves=args.curves) as ctx:
        cfg, model = ctx.params.encoder, ctx.params.model
        # In the project folder rather than /tmp, where a cluster's workers read the shards, and
        # not beside the output, whose folder encoder_init depends on.
        with tempfile.TemporaryDirectory(prefix=".letters-", dir=Path.cwd()) as letters:
            count = glyphs.write_letters(Path(letters), cfg.seed, args.size, args.letters, ctx.params.data.shard_rows)
            job = JobConfig(train=cfg, model=model, num_classes=len(glyphs.LETTERS))
            state = train(ctx, EncoderClassify(classify=(Path(letters),)), job, inputs=[Path(letters)])
        save_weights(args.out, encoder_weights(state["model"]), ENCODER, model, None)
        ctx.summary |= {"letters": count, "out": str(args.out)}


if __name__ == "__main__":
    main()
