import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config.params import DataConfig, ModelConfig, ShapeScenesConfig
from pipeline.data.prepare import prepare
from pipeline.models.checkpoints import DENOISER, save_weights
from pipeline.models.denoising import DENOISE_CHANNELS
from pipeline.models.transunet import build_network
from pipeline.tools.ddep_check import CONDITIONS, denoising_losses

ROOT = Path(__file__).resolve().parent.parent


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network(ModelConfig(), DENOISE_CHANNELS)


def test_taking_a_feature_away_changes_the_loss_only_if_the_decoder_reads_it():
    images = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8)
    net = _net()
    losses = denoising_losses(net, images, sigma=0.2, batch_size=4)
    assert list(losses) == list(CONDITIONS)
    assert all(losses[c] != losses["as trained"] for c in CONDITIONS[1:])
    torch.nn.init.zeros_(net.decoder.conv_more[0].weight)  # a decoder blind to the transformer's map
    blind = denoising_losses(net, images, sigma=0.2, batch_size=4)
    assert blind["tokens zeroed"] == blind["tokens of another image"] == blind["as trained"]
    assert blind["skips zeroed"] != blind["as trained"]
    assert denoising_losses(net, images, sigma=0.2, batch_size=6) == pytest.approx(blind)  # batches add up


def test_the_command_tables_each_pretrained_files_losses_on_the_val_images(tmp_path):
    prepared = tmp_path / "prepared"
    prepare(DataConfig(labeled_fraction=0.25, shapes=ShapeScenesConfig(train_scenes=8, val_scenes=5)), prepared)
    save_weights(tmp_path / "denoiser.pt", _net().without_noise_level(), DENOISER, ModelConfig(), None)
    (tmp_path / "params.yaml").write_text("decoder_pretrain:\n  sigma: 0.3\n")
    result = subprocess.run([sys.executable, "-m", "pipeline.tools.ddep_check", "denoiser.pt", "--prepared", "prepared"],
                            cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""}, check=False)
    assert result.returncode == 0, result.stderr
    assert "on 5 val images of prepared, σ = 0.3" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("| `denoiser.pt` |"))
    assert len(row.split("|")) == len(CONDITIONS) + 3
    missing = subprocess.run([sys.executable, "-m", "pipeline.tools.ddep_check", "gone.pt", "--prepared", "prepared"],
                             cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""}, check=False)
    assert missing.returncode == 1 and missing.stderr.startswith("error: ") and "gone.pt" in missing.stderr


def test_without_a_val_split_the_command_says_so_in_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    save_weights(tmp_path / "denoiser.pt", _net().without_noise_level(), DENOISER, ModelConfig(), None)
    result = subprocess.run([sys.executable, "-m", "pipeline.tools.ddep_check", "denoiser.pt", "--prepared", "nowhere"],
                            cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""}, check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: nowhere/val: no val split")
