"""The stored result of one classified case: a diagnosis, or the finding that the image is out of
distribution.

A diagnosis carries the calibrated probabilities, label, uncertainty and referral, and a Grad-CAM
heat map made under its own time budget (past it, or if it fails, the result stands without one).
When the model's out-of-distribution gate flags the image (:mod:`ml.ood`: blank, noise, colours
unlike dermoscopy, features unlike the training lesions), the model's answer is not a diagnosis: the
result says ``out_of_distribution`` with the gate's reasons and stores no label, probabilities,
confidence, uncertainty or referral, and no heat map (there is nothing to explain;
``gradcam_status`` is ``not_applicable``). Such a case still succeeds: the input was judged, and
retrying would judge it the same way.

The one-case path (:mod:`worker.pipeline`) and dynamic batches (:mod:`worker.batching`) both build
their results here, so the two store the same thing for the same image.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from celery.exceptions import SoftTimeLimitExceeded

from core import case_states
from core.config import Settings
from core.models import Outcome
from worker import runtime
from worker.budget import GradcamTimeout, time_budget

if TYPE_CHECKING:
    from ml.images import DecodedImage
    from ml.predictor import Analysis, Prediction, Predictor

log = logging.getLogger("dermq.worker")

#: ``gradcam_status`` of a result with no diagnosis to explain
GRADCAM_NOT_APPLICABLE = "not_applicable"
#: kept free before the task's soft time limit for storing what was classified
STORE_SECONDS = 2.0


def heatmap(
    predictor: Predictor, decoded: DecodedImage, analysis: Analysis, seconds: float
) -> tuple[bytes | None, str]:
    """The Grad-CAM overlay PNG of a diagnosis and its ``gradcam_status`` (``ok``, ``timeout`` or
    ``error``; no PNG unless ``ok``), within ``seconds``."""
    if seconds <= 0:
        log.warning(
            "no time left for a heat map before the task's soft limit; storing the result without one",
            extra={"event": "gradcam_timeout", "seconds": 0.0},
        )
        return None, "timeout"
    try:
        with time_budget(seconds):
            explanation = predictor.explain(decoded.image, analysis)
        return explanation.overlay_png, "ok"
    except GradcamTimeout:
        log.warning(
            "Grad-CAM ran past its budget; storing the result without a heat map",
            extra={"event": "gradcam_timeout", "seconds": seconds},
        )
        return None, "timeout"
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:
        if runtime.device_failed(exc):
            raise  # the GPU is gone, not the heat map: its cases go back to the queue, the child ends (tasks)
        log.warning(
            "Grad-CAM failed; storing the result without a heat map",
            extra={"event": "gradcam_error", "error": type(exc).__name__},
        )
        return None, "error"


def diagnosis_fields(prediction: Prediction) -> dict[str, Any]:
    """The result columns of a diagnosis."""
    return {
        "outcome": Outcome.DIAGNOSIS.value,
        "ood_reasons": [],
        "label": prediction.label,
        "probabilities": prediction.probabilities,
        "confidence": prediction.confidence,
        "uncertainty": prediction.uncertainty,
        "referral": prediction.referral,
        "referral_reasons": list(prediction.referral_reasons),
    }


def out_of_distribution_fields(prediction: Prediction) -> dict[str, Any]:
    """The result columns of an image the gate flagged: its reasons, and none of the model's raw answer."""
    return {
        "outcome": Outcome.OUT_OF_DISTRIBUTION.value,
        "ood_reasons": list(prediction.ood_reasons),
        "label": None,
        "probabilities": None,
        "confidence": None,
        "uncertainty": None,
        "referral": None,
        "referral_reasons": [],
    }


def completion(
    config: Settings,
    case_id: uuid.UUID,
    attempt: int,
    decoded: DecodedImage,
    analysis: Analysis,
    predictor: Predictor,
    timings: dict[str, float],
    started: float,
    *,
    working_copy: bool,
    limit_started: float | None = None,
) -> case_states.Completion:
    """The result row (and heat map, for a diagnosis) of one classified case. ``timings`` gains
    ``gradcam`` (for a diagnosis) and ``total`` (from ``started``, a ``perf_counter`` reading).
    ``limit_started``: when the task's soft time limit began to run, if before ``started``."""
    from ml import drift  # NumPy: only the worker image has it (beat and Flower import worker.tasks too)

    prediction = analysis.prediction
    heatmap_png: bytes | None = None
    if prediction.out_of_distribution:
        fields, gradcam_status = out_of_distribution_fields(prediction), GRADCAM_NOT_APPLICABLE
        log.info(
            "image out of distribution; no diagnosis made",
            extra={"event": "out_of_distribution"},  # its reasons are sealed with the result, never logged
        )
    else:
        gradcam_started = time.perf_counter()
        # a batch explains its cases one after another under one soft limit: each heat map gets what
        # is left of it, less the time to store the batch, so the limit never falls inside one
        left = config.task_soft_time_limit - STORE_SECONDS - (gradcam_started - min(started, limit_started or started))
        heatmap_png, gradcam_status = heatmap(predictor, decoded, analysis, min(config.gradcam_budget_seconds, left))
        timings["gradcam"] = time.perf_counter() - gradcam_started
        fields = diagnosis_fields(prediction)
    timings["total"] = time.perf_counter() - started
    result = fields | {
        "gradcam_status": gradcam_status,
        "gradcam_class": prediction.label if heatmap_png is not None else None,
        "model_id": predictor.info.model_id,
        "weights_sha256": predictor.info.weights_sha256,
        "device": str(predictor.device),
        "timings": {k: round(v, 6) for k, v in timings.items()},
        "input_stats": drift.input_statistics(decoded.image, decoded.width, decoded.height),
    }
    return case_states.Completion(case_id, attempt, result, heatmap_png, working_copy=working_copy)
