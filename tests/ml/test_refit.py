"""ml.refit: a finished entry's weights served with another resampler and gate stride become a new
entry, fitted and measured again, that says where its weights come from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from ml import evaluate, preprocess, refit, registry, train
from ml.predictor import Predictor
from tests.ml.conftest import TINY_RUN


def test_a_refit_serves_the_same_weights_with_its_own_preprocessing_gate_and_figures(
    synthetic_folder: Path, tmp_path: Path
) -> None:
    source = tmp_path / "registry" / "synthetic-v1"
    train.main(["--data", str(synthetic_folder), "--out", str(source), "--epochs", "2", *TINY_RUN])
    out = tmp_path / "registry" / "synthetic-v2"
    refit.main(["--source", str(source), "--out", str(out), "--data", str(synthetic_folder),
                "--interpolation", preprocess.ANTIALIASED, "--gate-stride", "2"])  # fmt: skip

    before, after = registry.read_manifest(source), registry.read_manifest(out)
    assert after["model_id"] == "synthetic-v2" and after["version"] == "2.0.0"
    shipped, refitted = load_file(str(source / registry.WEIGHTS)), load_file(str(out / registry.WEIGHTS))
    assert list(shipped) == list(refitted)  # not trained again: the same float16 values, tensor for tensor
    assert all(shipped[k].dtype == refitted[k].dtype and np.array_equal(shipped[k], refitted[k]) for k in shipped)
    assert after["preprocessing"] == before["preprocessing"] | {"interpolation": preprocess.ANTIALIASED}
    assert before["ood"]["pixel_stride"] == 1 and after["ood"]["pixel_stride"] == 2
    assert after["training"]["refit_of"] == {
        "model_id": "synthetic-v1",
        "weights_sha256": before["files"]["weights"]["sha256"],
        "interpolation": [before["preprocessing"]["interpolation"], preprocess.ANTIALIASED],
        "gate_stride": [1, 2],
        "source_pixels_sha256": before["data"]["pixels_sha256"],
    }
    # the source's run, as its card told it: trained with the source's resampler, on the source's pixels
    assert after["training"]["epochs_run"] == before["training"]["epochs_run"] == 2
    assert after["training"]["config"]["interpolation"] == before["preprocessing"]["interpolation"]
    assert after["data"]["pixels_sha256"] == {}  # none of this entry's inputs were digested in training
    assert after["metrics"]["test"]["n"] == before["metrics"]["test"]["n"]
    card = (out / "model_card.md").read_text()
    assert "Refit, not retrained" in card and "`synthetic-v1`'s weights" in card
    history = refit.history_from_card((source / "model_card.md").read_text())
    assert [row["epoch"] for row in history] == [1, 2] and refit.history_from_card(card) == history

    predictor = Predictor.load(out, device="cpu")
    assert predictor.prep.interpolation == preprocess.ANTIALIASED
    assert predictor.gate is not None and predictor.gate.stride == 2
    blank = predictor.predict([Image.new("RGB", (48, 40), (255, 255, 255))])[0]
    assert blank.out_of_distribution and "blank" in blank.ood_reasons

    # what a refit does not name stays the source's: here the resampler and the stride of 2
    again = tmp_path / "registry" / "synthetic-v3"
    config = refit.prepare(out, again, str(synthetic_folder), interpolation="", gate_stride=None)
    settled = json.loads((Path(config.workdir) / "refit.json").read_text())
    assert settled["interpolation"] == [preprocess.ANTIALIASED] * 2 and settled["gate_stride"] == [2, 2]

    # other data (here most of the same images) gives another lesion split, whose held-out parts hold
    # lesions the weights were trained on: refused for a refit and for a named part of the split
    other = tmp_path / "other"
    other.mkdir()
    lines = (synthetic_folder / "metadata.csv").read_text().splitlines()
    (other / "metadata.csv").write_text("\n".join(lines[:-5]) + "\n")
    shutil.copytree(synthetic_folder / "images", other / "images")
    with pytest.raises(SystemExit, match="not the data this model was trained on"):
        refit.prepare(out, tmp_path / "registry" / "synthetic-v4", str(other), interpolation="", gate_stride=None)
    with pytest.raises(SystemExit, match="not the data this model was trained on"):
        evaluate.select_samples(after, str(other), "test")
    assert evaluate.select_samples(after, str(other), "auto")[1] == "all"  # with a warning and a caveat
    assert evaluate.select_samples(after, str(other), "auto", str(synthetic_folder))[1] == "unseen"
    assert evaluate.select_samples(after, str(synthetic_folder), "auto")[1] == "test"


def test_the_history_is_read_from_the_cards_table() -> None:
    card = "\n".join(
        [
            "## Calibration", "| 3 | 0.1 | 0.2 | 0.3 | 0.4 |",  # another table: not the history
            "## Training history", "", "| epoch | train loss | val balanced acc. | val accuracy | minutes |",
            "| ---: | ---: | ---: | ---: | ---: |", "| 1 | 0.930 | 0.676 | 0.804 | 7.6 |",
            "| 2 | 0.495 | 0.720 | 0.825 | 13.4 |",
        ]
    )  # fmt: skip
    history = refit.history_from_card(card)
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[1] == {
        "epoch": 2, "train_loss": 0.495, "val_balanced_accuracy": 0.72, "val_accuracy": 0.825, "minutes": 13.4
    }  # fmt: skip
    assert refit.history_from_card("no table") == []


def test_a_refit_names_a_known_resampler_and_a_positive_stride(tiny_entry: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="unknown interpolation"):
        refit.prepare(tiny_entry, tmp_path / "x", "data", interpolation="lanczos", gate_stride=2)
    with pytest.raises(SystemExit, match="at least 1"):
        refit.prepare(tiny_entry, tmp_path / "x", "data", interpolation="", gate_stride=0)
    assert not (tmp_path / "x.work").exists()
