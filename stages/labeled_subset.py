"""DVC stage `labeled_subset` (label-efficiency studies): a labeled split of a given fraction of
the train images, drawn by a seed from every prepared image that has a mask."""

from pathlib import Path

from pipeline.data.prepare import labeled_subset
from pipeline.orchestrate.stage_run import stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--fraction", type=float, required=True, help="share of the train images, in (0, 1]")
    parser.add_argument("--seed", type=int, required=True, help="which subset; nested across fractions")
    parser.add_argument("--out", type=Path, required=True, help="folder for the labeled split")
    parser.add_argument("--unlabeled-out", type=Path, help="folder for the rest of the train images (masks kept aside)")
    args = parser.parse_args()
    with stage("labeled_subset", ["data"], args.prepared, overrides=args.overrides) as ctx:
        labeled, unlabeled = labeled_subset(args.prepared, args.fraction, args.seed, args.out,
                                            ctx.params.data.shard_rows, args.unlabeled_out)
        ctx.summary |= {"fraction": args.fraction, "seed": args.seed, "images": labeled, "unlabeled": unlabeled}


if __name__ == "__main__":
    main()
