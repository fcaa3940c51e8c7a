"""The model card says what its run did: the recipe's words and the known limits come from the run's
configuration and the test split's counts, so the shipped card is written again word for word, and a run
with another recipe (v1's: square input, no rotation, no whole-image last epoch) is described as it ran."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from ml import registry
from ml.modelcard import write_model_card
from ml.recipe import RECIPES

SHIPPED = registry.REGISTRY_DIR / registry.DEFAULT_MODEL
HISTORY = "## Training history"


@pytest.fixture(scope="module")
def shipped() -> tuple[dict[str, Any], dict[str, Any]]:
    if not SHIPPED.is_dir():
        pytest.skip("no shipped model")
    return registry.read_manifest(SHIPPED), json.loads((SHIPPED / registry.METRICS).read_text())


def card(folder: Path, manifest: dict[str, Any], metrics: dict[str, Any]) -> str:
    """The card's text up to its training history (a work folder's, which the entry does not keep)."""
    folder.mkdir()
    return write_model_card(folder, manifest, metrics, []).read_text().split(HISTORY)[0]


def words(text: str) -> str:
    return " ".join(text.split())


def test_the_shipped_card_is_written_again_word_for_word(shipped, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    manifest, metrics = shipped
    assert card(tmp_path / "card", manifest, metrics) == (SHIPPED / "model_card.md").read_text().split(HISTORY)[0]


def test_a_v1_like_run_is_described_by_its_own_recipe_and_test_counts(shipped, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    manifest, metrics = copy.deepcopy(shipped)
    v1 = {**RECIPES["v1"], "input_size": list(RECIPES["v1"]["input_size"])}
    manifest["training"]["config"] |= {**v1, "balance_power": 1.0, "augment_strength": 0.6}
    manifest["preprocessing"]["input_size"] = v1["input_size"]
    manifest["data"]["summary"]["test"] |= {"akiec": 12, "df": 25, "vasc": 18}
    text = words(card(tmp_path / "v1", manifest, metrics))
    assert (
        "resize (192x192, 1:1, colour constancy none), class-balanced sampling, crops of 73-100% of the area, "
        "flips, colour and hue jitter, blur and random erasing; AdamW"
    ) in text
    assert "any-angle rotation" not in text and "whole images" not in text and "square-root" not in text
    assert "resized to 1:1 (192x192) without cropping: every upload of another shape is squashed" in text
    assert "4:3 without cropping" not in text
    assert "- Actinic keratoses and vascular lesions have under 20 test images each: their figures" in text
    assert text.count("under 20 test images") == 1  # dermatofibroma, with 25, is not named

    manifest["training"]["config"] |= {"augment_strength": 0.0, "balance_power": 0.0, "rotate": True}
    manifest["data"]["summary"]["test"] |= {"akiec": 40, "vasc": 40, "df": 3}
    text = words(card(tmp_path / "plain", manifest, metrics))
    assert "sampling in proportion to the classes' counts, any-angle rotation, flips; AdamW" in text
    assert "- Dermatofibroma has under 20 test images: its figures have wide confidence intervals." in text
