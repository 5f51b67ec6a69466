"""DVC stage `prepare`: raw dataset -> Parquet splits + manifest."""

from pathlib import Path

from pipeline.prepare import prepare
from pipeline.stage import stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for the prepared splits")
    args = parser.parse_args()
    with stage("prepare", ["data"], prepared=args.out, overrides=args.overrides) as ctx:
        manifest = prepare(ctx.params.data, args.out)
        ctx.summary = {"out": str(args.out), **manifest["counts"]}


if __name__ == "__main__":
    main()
