"""cluster/*.yaml are valid Ray cluster-launcher configs (Ray's own schema and checks) and
match the project: the Ray of the image is requirements.txt's, the project installs itself."""

import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.commands import prepare_config
from ray.autoscaler._private.util import validate_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "cluster").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_cluster_config_is_valid_for_ray_and_fits_the_project(path):
    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(config))
    ray_pin = re.search(r"^ray\[.*\]==([\d.]+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray_pin}-") and config["docker"]["image"].endswith("-gpu")
    assert any("make install-system" in c for c in config["setup_commands"])
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert workers and all(v["max_workers"] >= 1 and v.get("min_workers", 0) == 0 for v in workers.values())
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}


def test_a_typo_in_a_cluster_config_is_caught():
    config = yaml.safe_load(CONFIGS[0].read_text())
    config["available_node_types"]["gpu_worker"]["min_wrkers"] = 1
    with pytest.raises(Exception, match="min_wrkers"):
        validate_config(prepare_config(config))
