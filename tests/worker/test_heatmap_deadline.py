"""A batch explains its cases one after another under one soft time limit: a heat map only gets what
is left of it, so a case classified near the limit is stored without one instead of failing with
the batch."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from core.config import Settings
from ml import registry
from ml.images import decode
from ml.predictor import Predictor
from worker import results


def test_a_case_classified_near_the_soft_limit_keeps_its_answer_without_a_heat_map(
    settings: Settings, fixture_images: dict[str, Path]
) -> None:
    predictor = Predictor.load(registry.resolve(settings.model), device="cpu")
    decoded = decode(fixture_images["ISIC_0024313"].read_bytes())
    (analysis,) = predictor.classify([decoded.image])
    assert not analysis.prediction.out_of_distribution

    def completed(started: float) -> dict:  # type: ignore[type-arg]
        done = results.completion(
            settings, uuid.uuid4(), 1, decoded, analysis, predictor, {}, started, working_copy=False
        )
        assert done.result["label"] == analysis.prediction.label  # the answer is kept either way
        return done.result | {"png": done.heatmap_png}

    fresh = completed(time.perf_counter())
    assert fresh["gradcam_status"] == "ok" and fresh["png"]
    late = completed(time.perf_counter() - settings.task_soft_time_limit + results.STORE_SECONDS / 2)
    assert late["gradcam_status"] == "timeout" and late["png"] is None
