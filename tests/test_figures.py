from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.infer import figures

CLASSES = ["background", "wire", "blob"]
COLOURS = np.zeros((256, 3), dtype=np.uint8)
COLOURS[:3] = [[0, 0, 0], [200, 0, 0], [0, 200, 0]]


@pytest.fixture
def saved(monkeypatch):
    """The figures the functions would write, kept open to be looked at."""
    kept = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: kept.append(fig))
    return kept


def _legend(fig) -> list[tuple[str, tuple]]:
    (legend,) = fig.legends
    return [(text.get_text(), tuple(patch.get_facecolor()[:3]))
            for text, patch in zip(legend.get_texts(), legend.get_patches())]


def test_grids_that_colour_classes_name_each_colour_in_a_legend(saved):
    masks = torch.randint(0, 3, (2, 8, 8))
    figures.prediction_grid(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), {"truth": masks, "student": masks},
                            COLOURS, CLASSES, Path("grid.png"))
    labels = [np.random.default_rng(0).integers(0, 3, (8, 8))]
    figures.pseudo_label_grid([np.zeros((8, 8, 3), np.uint8)], labels, [np.zeros((8, 8), np.uint8)], [None],
                              COLOURS, CLASSES, Path("pseudo.png"))
    expected = [("background", (0.0, 0.0, 0.0)), ("wire", (200 / 255, 0.0, 0.0)), ("blob", (0.0, 200 / 255, 0.0))]
    assert [_legend(fig) for fig in saved] == [expected, expected]
