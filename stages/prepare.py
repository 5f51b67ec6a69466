"""DVC stage `prepare`: raw dataset -> Parquet splits + manifest."""

import argparse
from pathlib import Path

from pipeline.prepare import prepare
from pipeline.stage import stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for the prepared splits")
    args = parser.parse_args()
    with stage("prepare", ["data"], prepared=args.out) as ctx:
        manifest = prepare(ctx.params.data, args.out)
        ctx.summary = {"out": str(args.out), **manifest["counts"]}


if __name__ == "__main__":
    main()
