"""Compose params.yaml from conf/ presets with Hydra, validate it, write it atomically.

    python -m pipeline.compose                         # the defaults (what is committed)
    python -m pipeline.compose model=r50_vit_b16       # pick a preset
    python -m pipeline.compose experiment=smoke decoder_pretrain.sigma=0.4 --out other.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from pipeline.config.params import PARAMS_FILE, ConfigError, Params, parse_params, section_dict
from pipeline.data.atomic import write_text_atomic

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
HEADER = ("# Written by `python -m pipeline.compose{args}` from conf/ (Hydra presets) and the typed\n"
          "# defaults in pipeline/config/params.py. Edit values here and `dvc repro`, or recompose.\n")


def compose(overrides: list[str], conf_dir: Path = CONF_DIR) -> Params:
    """Hydra-compose `conf/config.yaml` with `overrides` and validate it as `Params`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    ConfigStore.instance().store(name="params_schema", node=Params)
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides)
        raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"{conf_dir}: {err}") from None
    return parse_params(raw, source=f"conf/ with overrides {overrides}")


def render(params: Params, overrides: list[str]) -> str:
    body = {name: section_dict(params, name) for name in Params.__dataclass_fields__}
    args = (" " + " ".join(overrides)) if overrides else ""
    return HEADER.format(args=args) + yaml.safe_dump(body, sort_keys=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: group=option or key=value")
    parser.add_argument("--out", type=Path, default=Path(PARAMS_FILE))
    args = parser.parse_args(argv)
    try:
        text = render(compose(args.overrides), args.overrides)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    write_text_atomic(args.out, text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
