"""ml.metrics and ml.evaluate: figures agree with isic-challenge-scoring; the CLI writes its report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore

from ml import data as ds
from ml import evaluate, metrics, registry
from ml.calibration import softmax
from ml.labels import CLASSES


def isic_score(truth: np.ndarray, scores: np.ndarray) -> ClassificationScore:
    index = pd.Index([f"ISIC_{i:07d}" for i in range(len(truth))], name="image")
    truth_frame = pd.DataFrame(np.eye(len(CLASSES))[truth], index=index, columns=list(CLASSES))
    weights = pd.DataFrame({"score_weight": 1.0, "validation_weight": 1.0}, index=index)
    return ClassificationScore(
        truth_frame,
        pd.DataFrame(scores, index=index, columns=list(CLASSES)),
        weights,
        ClassificationMetric.BALANCED_ACCURACY,
    )


@pytest.fixture(scope="module")
def predictions() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    truth = rng.choice(len(CLASSES), size=900, p=[0.04, 0.05, 0.11, 0.02, 0.11, 0.65, 0.02])
    logits = rng.normal(0, 1.2, size=(900, len(CLASSES)))
    logits[np.arange(900), truth] += rng.normal(1.5, 1.0, size=900)  # informative but imperfect
    probabilities = softmax(logits)
    return truth, probabilities, probabilities.argmax(1)


def test_per_class_figures_agree_with_isic_challenge_scoring(predictions: tuple[np.ndarray, ...]) -> None:
    truth, probabilities, predicted = predictions
    ours = metrics.summary(truth, predicted, probabilities)
    # ISIC thresholds each class probability at 0.5 for its binary figures; one-hot decisions make
    # that the one-vs-rest reading of the multiclass label, which is what dermq reports.
    decisions = isic_score(truth, np.eye(len(CLASSES))[predicted])
    ranking = isic_score(truth, probabilities)
    assert ours["balanced_accuracy"] == pytest.approx(decisions.aggregate["balanced_accuracy"], abs=1e-9)
    assert ours["balanced_accuracy"] == pytest.approx(ranking.aggregate["balanced_accuracy"], abs=1e-9)
    for code in CLASSES:
        row = decisions.per_category.loc[code]
        for name in ("sensitivity", "specificity", "ppv", "npv"):
            assert ours["per_class"][code][name] == pytest.approx(row[name], abs=1e-9), (code, name)
        assert ours["per_class"][code]["auc"] == pytest.approx(ranking.per_category.loc[code, "auc"], abs=1e-9)
        assert ours["per_class"][code]["f1"] == pytest.approx(row["dice"], abs=1e-9)  # F1 is Dice
    assert ours["macro_auc"] == pytest.approx(ranking.macro_average["auc"], abs=1e-9)


def test_confusion_matrix_and_auc_edge_cases() -> None:
    truth = np.array([0, 0, 1, 2])
    predicted = np.array([0, 1, 1, 1])
    matrix = metrics.confusion_matrix(truth, predicted)
    assert matrix[0].tolist()[:3] == [1, 1, 0] and matrix.sum() == 4
    assert metrics.roc_auc(np.array([True, True]), np.array([0.1, 0.2])) is None
    assert metrics.roc_auc(np.array([True, False, True, False]), np.array([0.9, 0.1, 0.5, 0.5])) == 0.875
    assert metrics.balanced_accuracy(truth, predicted) == pytest.approx((0.5 + 1 + 0) / 3)


def test_the_plotted_roc_curve_has_the_area_of_the_reported_auc_when_scores_tie() -> None:
    """The curve steps once per distinct score: tied positives and negatives are one diagonal step, as
    the AUC counts them (half). Stepping image by image drew, for four images of one score (two of them
    the class), a curve of area 0.75 beside a legend's AUC of 0.5."""
    rng = np.random.default_rng(5)
    cases = [
        (np.array([True, False, True, False]), np.array([0.5, 0.5, 0.5, 0.5])),
        (np.array([False, True, True, False, False]), np.array([0.9, 0.9, 0.1, 0.1, 0.1])),
        (rng.random(300) < 0.3, np.round(rng.random(300), 1)),  # probabilities at one decimal: many ties
    ]
    for positive, score in cases:
        fpr, tpr = metrics.roc_curve(positive, score)
        assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
        assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.roc_auc(positive, score), abs=1e-12)
    fpr, tpr = metrics.roc_curve(*cases[0])
    assert fpr.tolist() == [0, 1] and tpr.tolist() == [0, 1]  # one threshold, one point past the origin


def test_evaluate_cli_writes_metrics_plots_and_report(tiny_entry: Path, tmp_path: Path) -> None:
    data = Path(__file__).resolve().parents[1] / "fixtures" / "images"
    out = tmp_path / "eval"
    assert evaluate.main(["--model", str(tiny_entry), "--data", str(data), "--out", str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["split"] == "all" and result["n"] == 9
    for key in ("balanced_accuracy", "accuracy", "ece", "per_class", "macro_auc", "confusion_matrix", "subgroups"):
        assert key in result
    assert set(result["per_class"]) == set(CLASSES)
    assert set(result["per_class"]["mel"]) >= {"sensitivity", "specificity", "ppv", "npv", "f1", "auc"}
    assert set(result["subgroups"]) == {"sex", "age_band", "site"}
    assert sum(g["n"] for g in result["subgroups"]["sex"].values()) == 9
    assert np.array(result["confusion_matrix"]).sum() == 9
    for name in ("confusion_matrix.png", "reliability.png", "roc.png", "report.md"):
        assert (out / name).stat().st_size > 1000
    assert "balanced multiclass accuracy" in (out / "report.md").read_text()


def test_evaluation_turns_off_the_tf32_a_gpu_would_otherwise_convolve_in(tiny_entry: Path, tmp_path: Path) -> None:
    """The figures are documented as float32, the precision they were fitted and are served in; on a
    GPU, cuDNN convolves float32 in TF32 unless the process says otherwise (PyTorch's default: True)."""
    from torch.backends import cuda, cudnn

    before = (cudnn.allow_tf32, cuda.matmul.allow_tf32)
    cudnn.allow_tf32 = cuda.matmul.allow_tf32 = True  # as a process that asked for TF32 would have them
    try:
        data = Path(__file__).resolve().parents[1] / "fixtures" / "images"
        evaluate.run(tiny_entry, data, tmp_path / "eval", split="all")
        assert (cudnn.allow_tf32, cuda.matmul.allow_tf32) == (False, False)
    finally:  # process-wide: put back for the tests after this one
        cudnn.allow_tf32, cuda.matmul.allow_tf32 = before


def test_evaluate_cli_reports_bad_input(tiny_entry: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate.main(["--model", str(tiny_entry), "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err


def test_outputs_a_chunk_at_a_time_equal_one_pass(tiny_entry: Path, fixture_pil) -> None:  # type: ignore[no-untyped-def]
    from ml.predictor import Predictor

    predictor = Predictor.load(tiny_entry, device="cpu")
    images = fixture_pil[:5]
    whole = predictor.outputs(images)
    chunked = evaluate.model_outputs(predictor, images, chunk=2)  # three chunks behind the progress bar
    for name in whole._fields:
        assert np.allclose(getattr(chunked, name), getattr(whole, name), atol=1e-5), name


def test_served_referrals_apply_the_gate_as_a_clinic_gets_it() -> None:
    """A gated image gets no referral, only a request to retake it: a melanoma the rule would refer
    but the gate flags is counted gated, not referred; one neither referred nor gated is a miss."""
    mel, nv = CLASSES.index("mel"), CLASSES.index("nv")
    truth = np.array([mel, mel, mel, mel, nv, nv])
    referred = np.array([True, True, False, True, False, True])
    gated = np.array([False, True, False, False, True, False])
    served = metrics.served_referrals(truth, referred, gated, np.array([mel]))
    assert served["concerning_referred"] == 0.5 and served["concerning_gated"] == 0.25
    assert served["concerning_missed"] == 0.25 and served["gated"] == pytest.approx(2 / 6)
    assert served["gated_by_class"]["mel"] == 0.25 and served["gated_by_class"]["nv"] == 0.5
    assert served["gated_by_class"]["df"] is None


def _entry_trained_on(entry: Path, data: Path) -> Path:
    """``entry``'s manifest recording ``data`` as the data it was trained on (digest and split)."""
    manifest = registry.read_manifest(entry)
    spec = ds.SplitSpec(val_fraction=0.25, test_fraction=0.25)
    manifest["data"] = {"digest": ds.dataset_digest(ds.read_dataset(data)), **spec.record()}
    registry.write_json_atomic(entry / registry.MANIFEST, manifest)
    return entry


def test_another_folder_with_the_training_lesions_is_not_scored_silently(  # type: ignore[no-untyped-def]
    tiny_entry: Path, synthetic_folder: Path, tmp_path: Path, capsys
) -> None:
    """A folder other than the training data may hold its lesions (the larger HAM10000 samples, the
    full release, a copy missing a few images): ``auto`` scored every image of it as if held out. It
    still scores them (an evaluator's own data must be served), with a warning and the report's caveat;
    ``--training-data`` leaves the lesions the model was trained or tuned on out."""
    entry = _entry_trained_on(tiny_entry, synthetic_folder)
    other = tmp_path / "other"
    shutil.copytree(synthetic_folder, other)
    rows = (other / "metadata.csv").read_text().splitlines()
    (other / "metadata.csv").write_text("\n".join(rows[:-1]) + "\n")  # one image fewer: another digest
    base = ["--model", str(entry), "--data", str(other)]
    assert evaluate.main([*base, "--out", str(tmp_path / "auto")]) == 0  # an evaluator's own data is scored
    assert "--training-data" in capsys.readouterr().err  # with a warning, and the report's caveat
    warned = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    assert warned["split"] == "all" and "inflates" in warned["caveat"]

    assert evaluate.main([*base, "--out", str(tmp_path / "unseen"), "--training-data", str(synthetic_folder)]) == 0
    unseen = json.loads((tmp_path / "unseen" / "metrics.json").read_text())
    parts = ds.SplitSpec(val_fraction=0.25, test_fraction=0.25).apply(ds.read_dataset(synthetic_folder))
    held_out = {s.image_id for s in parts.test} & {s.image_id for s in ds.read_dataset(other)}
    assert unseen["split"] == "unseen" and unseen["n"] == len(held_out) < len(rows) - 2

    assert evaluate.main([*base, "--out", str(tmp_path / "all"), "--split", "all"]) == 0
    scored = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert scored["n"] == len(rows) - 2 and "inflates" in scored["caveat"]
    assert "inflates" in (tmp_path / "all" / "report.md").read_text()


def test_a_subgroups_referral_sensitivity_says_how_many_cases_it_is_of() -> None:
    """The card's "referral sens." of a body site read 1.000 with nothing to say it came from three
    malignant images (melanoma sensitivity has its "mel n" beside it); and ml.evaluate's report gave a
    15-bin ECE for a group of two images, which the card already withholds below 50."""
    from ml.decision import DecisionPolicy
    from ml.modelcard import ECE_MIN_N, subgroup_table

    rng = np.random.default_rng(4)
    codes = ["nv"] * 60 + ["mel", "bcc", "akiec"] + ["bkl", "nv"]
    samples = [
        ds.Sample(f"ISIC_{i:07d}", f"HAM_{i:07d}", dx, Path("x.jpg"), site="back" if i < 60 else "ear")
        for i, dx in enumerate(codes)
    ]
    logits = rng.normal(0, 1, (len(samples), len(CLASSES)))
    result, _, _ = evaluate.evaluate_arrays(samples, logits, DecisionPolicy())
    ear = result["subgroups"]["site"]["ear"]
    assert ear["n"] == 5 and ear["concerning_n"] == 3 and result["subgroups"]["site"]["back"]["concerning_n"] == 0
    row = next(line for line in subgroup_table(result["subgroups"]["site"]) if line.startswith("| ear "))
    assert f"{ear['referral_sensitivity_concerning']:.3f} (n = 3)" in row
    report = evaluate.report_markdown(result, "synthetic")
    ear_line = next(line for line in report.splitlines() if line.startswith("| ear "))
    assert "(n = 3)" in ear_line and f"n/a (n < {ECE_MIN_N})" in ear_line
