"""DVC stage `prepare`: raw dataset -> Parquet splits + manifest."""

from pathlib import Path

from pipeline.data.prepare import prepare
from pipeline.orchestrate.stage_run import stage, stage_parser
from pipeline.runtime.storage import worker_uris


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for the prepared splits")
    parser.add_argument("--incremental", action="store_true",
                        help="prepare params' incremental steps too (the pipeline's prepare; the study's has none)")
    args = parser.parse_args()
    sections = ["data", "incremental"] if args.incremental else ["data"]
    with stage("prepare", sections, prepared=args.out, overrides=args.overrides) as ctx:
        manifest = prepare(ctx.params.data, args.out, ctx.params.incremental if args.incremental else None)
        ctx.summary = {"out": str(args.out), **manifest["counts"]}
        if ctx.params.ray.data_uri:  # the workers' copies, in place before the first training stage
            shards = sorted(args.out.glob("*/*.parquet"))
            ctx.summary["shards_in_data_uri"] = len(worker_uris(shards, ctx.params.ray.data_uri))


if __name__ == "__main__":
    main()
