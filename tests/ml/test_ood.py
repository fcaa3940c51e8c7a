"""ml.ood and ml.oodset: what the out-of-distribution gate flags, what it lets through, and how it ships."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from ml import ood, oodset, registry
from ml.entry import save_gate
from ml.predictor import Predictor


def _lesion_like(rng: np.random.Generator, n: int, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """Smooth skin-toned images with a darker blob in the middle (uint8 NHWC)."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((n, h, w, 3), dtype=np.float64)
    for i in range(n):
        skin = rng.uniform([190, 140, 120], [235, 185, 165])
        radius = rng.uniform(8, 16)
        blob = np.exp(-(((yy - h / 2) ** 2 + (xx - w / 2) ** 2) / (2 * radius**2)))[..., None]
        out[i] = skin * (1 - 0.6 * blob) + rng.normal(0, 2, (h, w, 3))
    return np.clip(out, 0, 255).astype(np.uint8)


CENTRES = np.random.default_rng(1).normal(0, 3, (7, 32))


def _fit(rng: np.random.Generator, stride: int = 1) -> tuple[ood.OODGate, np.ndarray, np.ndarray]:
    """A gate fitted on features around :data:`CENTRES` and lesion-like images; with its validation
    logits and features."""
    centres, k = CENTRES, CENTRES.shape[1]
    labels = rng.integers(0, 7, 1400)
    features = centres[labels] + rng.normal(0, 1, (1400, k))
    val_labels = rng.integers(0, 7, 600)
    val_features = centres[val_labels] + rng.normal(0, 1, (600, k))
    val_logits = rng.normal(0, 1, (600, 7)) + 4 * np.eye(7)[val_labels]
    gate = ood.fit(features, labels, _lesion_like(rng, 300), _lesion_like(rng, 600), val_logits, val_features,
                   components=16, stride=stride)  # fmt: skip
    return gate, val_logits, val_features


@pytest.fixture(scope="module")
def fitted() -> tuple[ood.OODGate, np.random.Generator]:
    rng = np.random.default_rng(0)
    return _fit(rng)[0], rng


def test_validation_lesions_are_rarely_flagged(fitted: tuple[ood.OODGate, np.random.Generator]) -> None:
    gate, rng = fitted
    labels = rng.integers(0, 7, 400)
    features = CENTRES[labels] + rng.normal(0, 1, (400, CENTRES.shape[1]))  # fresh draws of the same data
    logits = rng.normal(0, 1, (400, 7)) + 4 * np.eye(7)[labels]
    flagged = gate.reasons(gate.scores(_lesion_like(rng, 400), logits, features))
    assert np.mean([bool(r) for r in flagged]) <= 0.04


def test_blank_noise_and_far_features_are_flagged_with_their_reasons(
    fitted: tuple[ood.OODGate, np.random.Generator],
) -> None:
    gate, rng = fitted
    k = gate.mean.shape[0]
    blank = np.full((1, 48, 64, 3), 255, dtype=np.uint8)
    noise = rng.integers(0, 256, (1, 48, 64, 3)).astype(np.uint8)
    lesion = _lesion_like(rng, 1)
    near = CENTRES[[5]]
    far = CENTRES[[5]] + 40.0
    logits = 4 * np.eye(7)[[5]]
    assert "blank" in gate.reasons(gate.scores(blank, logits, near))[0]
    assert "noise" in gate.reasons(gate.scores(noise, logits, near))[0]
    assert "feature_distance" in gate.reasons(gate.scores(lesion, logits, far))[0]
    assert gate.reasons(gate.scores(lesion, logits, near)) == [()]
    blue = np.zeros((1, 48, 64, 3), dtype=np.uint8)
    blue[..., 2] = 200
    blue[:, ::2, :, 1] = 90  # stripes: contrast enough not to be blank, colours no dermatoscope shows
    assert "colour" in gate.reasons(gate.scores(blue, logits, near))[0]
    assert k == gate.whiten.shape[0]


def test_colour_statistics_are_the_plain_definition_to_the_bit() -> None:
    """The gate's thresholds were fitted on these statistics: the fast sums must give the very numbers
    the definition gives (means, spreads, centre minus border), not merely close ones."""
    batch = np.random.default_rng(3).integers(0, 256, (3, 168, 224, 3), dtype=np.uint8)
    x = batch.astype(np.float64)
    h, w = 168, 224
    mean = x.mean(axis=(1, 2))
    spread = np.sqrt(np.maximum((x**2).mean(axis=(1, 2)) - mean**2, 0.0))
    centre = x[:, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].mean(axis=(1, 2))
    rims = (x[:, : h // 8], x[:, -(h // 8) :], x[:, :, : w // 8], x[:, :, -(w // 8) :])
    border = sum(r.sum(axis=(1, 2)) for r in rims) / sum(r.shape[1] * r.shape[2] for r in rims)
    expected = np.concatenate([mean, spread, centre - border], axis=1)
    assert np.array_equal(ood.colour_statistics(batch), expected)
    assert np.array_equal(ood.colour_statistics(x), expected)  # float pixels: the float64 path
    for level in (0, 255):  # the extremes of the histograms and of float32's exact range
        flat = np.full((1, h, w, 3), level, dtype=np.uint8)
        assert np.array_equal(ood.colour_statistics(flat), ood.colour_statistics(flat.astype(np.float64)))


def test_image_scores_are_the_plain_definition_to_the_bit() -> None:
    """Contrast and noise as defined (the luminance's deviation; its mean distance from the sum of
    its nine shifted copies over nine), to the bit: the thresholds were fitted on these numbers."""
    rng = np.random.default_rng(4)
    smooth = np.repeat(np.repeat(rng.integers(0, 256, (2, 42, 56, 3), dtype=np.uint8), 4, axis=1), 4, axis=2)
    for batch in (rng.integers(0, 256, (3, 168, 224, 3), dtype=np.uint8), smooth, np.zeros((1, 5, 7, 3), np.uint8)):
        luma = batch.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        h, w = luma.shape[1:]
        padded = np.pad(luma, ((0, 0), (1, 1), (1, 1)), mode="edge")
        blurred = sum(padded[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9.0
        contrast = luma.std(axis=(1, 2))
        scores = ood.image_scores(batch)
        assert np.array_equal(scores["contrast"], contrast)
        assert np.array_equal(scores["noise"], np.abs(luma - blurred).mean(axis=(1, 2)) / np.maximum(contrast, 1.0))


def test_energy_is_high_where_no_class_is_recognised() -> None:
    confident = np.array([[10.0, 0, 0, 0, 0, 0, 0]])
    flat = np.zeros((1, 7))
    assert ood.energy(flat)[0] > ood.energy(confident)[0]


def test_gate_round_trips_through_the_registry(
    tiny_entry: Path, fitted: tuple[ood.OODGate, np.random.Generator]
) -> None:
    gate, _ = fitted
    save_gate(tiny_entry, gate)
    loaded = Predictor.load(tiny_entry, device="cpu", backend="torch").gate
    assert loaded is not None and loaded.thresholds == pytest.approx(gate.thresholds)
    np.testing.assert_array_equal(loaded.whiten, gate.whiten)  # the fitted gate is the stored one
    assert load_file(str(tiny_entry / "ood.safetensors"))["whiten"].dtype == np.float16


def test_a_tampered_gate_file_is_refused(tiny_entry: Path, fitted: tuple[ood.OODGate, np.random.Generator]) -> None:
    gate, _ = fitted
    save_gate(tiny_entry, gate)
    arrays = gate.arrays()
    arrays["whiten"] = arrays["whiten"] * 0  # a gate that never fires on distance
    save_file(arrays, str(tiny_entry / "ood.safetensors"))
    with pytest.raises(registry.IntegrityError):
        Predictor.load(tiny_entry, device="cpu", backend="torch")


def test_the_built_set_is_deterministic_and_has_every_kind(fixture_pil: list[Image.Image]) -> None:
    first = oodset.build(fixture_pil[:3], seed=1)
    second = oodset.build(fixture_pil[:3], seed=1)
    assert {kind for kind, _ in first} == set(oodset.KINDS)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (_, a), (_, b) in zip(first, second, strict=True))
    corrupted = [image for kind, image in first if kind == "corrupted"]
    # destroyed lesions keep the lesion's size but not its pixels in place
    assert corrupted[0].size == fixture_pil[0].size
    assert not np.array_equal(np.asarray(corrupted[0]), np.asarray(fixture_pil[0].convert("RGB")))


def test_the_stored_gate_flags_what_the_fitted_one_measured() -> None:
    """Few training images for many features (an ill-conditioned covariance): the gate as stored in
    float16 (the whitening map) must still flag about the share of validation images its thresholds were set for."""
    rng = np.random.default_rng(3)
    k = 64
    centres = rng.normal(0, 3, (7, k))
    labels = rng.integers(0, 7, 60)
    features = centres[labels] + rng.normal(0, 1, (60, k)) * np.geomspace(1, 1e-3, k)
    val_labels = rng.integers(0, 7, 200)
    val_features = centres[val_labels] + rng.normal(0, 1, (200, k)) * np.geomspace(1, 1e-3, k)
    val_logits = 4 * np.eye(7)[val_labels]
    gate = ood.fit(features, labels, _lesion_like(rng, 60), _lesion_like(rng, 200), val_logits, val_features)
    assert gate.whiten.shape[1] <= 15  # a quarter of the training images at most
    reloaded = ood.OODGate.from_arrays(gate.arrays(), gate.thresholds)
    flagged = reloaded.reasons(reloaded.scores(_lesion_like(np.random.default_rng(3), 200), val_logits, val_features))
    assert np.mean([bool(r) for r in flagged]) <= 0.05


def test_the_gate_s_reasons_over_a_batch_are_each_rows_own() -> None:
    thresholds = {"contrast": 10.0, "noise": 0.2, "colour": 40.0, "energy": -2.0, "distance": 1000.0}
    gate = ood.OODGate(
        mean=np.zeros(4), whiten=np.eye(4), class_means=np.zeros((7, 4)), colour_mean=np.zeros(9),
        colour_whiten=np.eye(9), thresholds=thresholds,
    )  # fmt: skip
    rng = np.random.default_rng(9)
    n = 500
    scores = {
        "contrast": rng.uniform(0, 20, n),
        "noise": rng.uniform(0, 0.4, n),
        "colour": rng.uniform(0, 80, n),
        "energy": rng.uniform(-4, 0, n),
        "distance": rng.uniform(0, 2000, n),
    }
    flagged = {
        "blank": scores["contrast"] < 10.0,
        "noise": scores["noise"] > 0.2,
        "colour": scores["colour"] > 40.0,
        "energy": scores["energy"] > -2.0,
        "feature_distance": scores["distance"] > 1000.0,
    }
    expected = [tuple(r for r in ood.REASONS if flagged[r][i]) for i in range(n)]
    assert gate.reasons(scores) == expected
    assert len(set(expected)) > 20  # most of the 32 combinations occur
    assert gate.reasons({k: v[:0] for k, v in scores.items()}) == []


def test_a_strided_gate_reads_every_other_pixel_flags_the_same_kinds_and_ships_its_stride(tiny_entry: Path) -> None:
    rng = np.random.default_rng(5)
    gate, val_logits, val_features = _fit(rng, stride=2)
    assert gate.stride == 2 and gate.describe()["pixel_stride"] == 2
    # what the image checks and colour statistics read: every second row and column, nothing else
    batch = _lesion_like(rng, 4, size=(168, 224))
    scores = gate.scores(batch, val_logits[:4], val_features[:4])
    for key, value in ood.image_scores(batch[:, ::2, ::2]).items():
        assert np.array_equal(scores[key], value)
    assert not np.array_equal(scores["contrast"], ood.image_scores(batch)["contrast"])
    same_arrays = ood.OODGate.from_arrays(gate.arrays(), gate.thresholds)  # stride 1
    assert np.array_equal(scores["colour"], same_arrays.colour(batch[:, ::2, ::2]))
    # thresholds fitted at that stride: lesions pass, a blank image and noise do not
    lesions = gate.reasons(gate.scores(_lesion_like(rng, 200), val_logits[:200], val_features[:200]))
    assert np.mean([bool(r) for r in lesions]) <= 0.05
    odd = np.stack([np.full((48, 64, 3), 255, np.uint8), rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)])
    blank, noise = gate.reasons(gate.scores(odd, val_logits[:2], val_features[:2]))
    assert "blank" in blank and "noise" in noise

    save_gate(tiny_entry, gate)
    assert registry.read_manifest(tiny_entry)["ood"]["pixel_stride"] == 2
    loaded = Predictor.load(tiny_entry, device="cpu", backend="torch").gate
    assert loaded is not None and loaded.stride == 2
    with pytest.raises(ValueError, match="at least 1"):
        ood.OODGate.from_arrays(gate.arrays(), gate.thresholds, stride=0)


def test_colour_statistics_of_a_large_batch_are_each_images_own() -> None:
    """A training split is scored a chunk at a time (its int64 copy whole would take gigabytes): the
    same numbers as one image at a time."""
    batch = np.random.default_rng(8).integers(0, 256, (150, 24, 32, 3), dtype=np.uint8)
    together = ood.colour_statistics(batch)
    assert together.shape == (150, 9)
    assert np.array_equal(together, np.concatenate([ood.colour_statistics(image[None]) for image in batch]))


@pytest.mark.parametrize("stride", [None, 2.5, True, "2"])
def test_a_gate_with_a_malformed_stride_is_refused(
    tiny_entry: Path, fitted: tuple[ood.OODGate, np.random.Generator], stride: object
) -> None:
    gate, _ = fitted
    save_gate(tiny_entry, gate)
    manifest = registry.read_manifest(tiny_entry)
    manifest["ood"]["pixel_stride"] = stride
    registry.write_json_atomic(tiny_entry / "manifest.json", manifest)
    with pytest.raises(registry.RegistryError, match="gate does not load"):
        Predictor.load(tiny_entry, device="cpu", backend="torch")


def test_the_image_checks_mean_and_std_are_numpys_to_the_bit() -> None:
    """image_scores calls the ufuncs NumPy's mean and std call, without their wrappers: the gate's
    thresholds were fitted on NumPy's own numbers, so every bit must be the same."""
    rng = np.random.default_rng(12)
    for shape in [(1, 84, 112), (3, 84, 112), (1, 168, 224), (2, 5, 7), (1, 1, 1)]:
        for scale in (1.0, 255.0, 3e4):
            x = (rng.random(shape, dtype=np.float32) * np.float32(scale)).astype(np.float32)
            assert np.array_equal(ood._image_mean(x.copy()), x.mean(axis=(1, 2)))
            assert np.array_equal(ood._image_std(x), x.std(axis=(1, 2)))
    flat = np.full((1, 84, 112), 37.25, dtype=np.float32)
    assert np.array_equal(ood._image_std(flat), flat.std(axis=(1, 2))) and ood._image_std(flat)[0] == 0.0


def _assert_distances_are_the_formula(gate: ood.OODGate, features: np.ndarray) -> None:
    """Each image's distance is the squared Mahalanobis distance to the nearest class mean computed
    in float64, to float32 rounding: in a batch (a matrix product), alone (a matrix-vector product)
    and with NumPy's BLAS on one thread (as a worker child runs it)."""
    import threadpoolctl

    whitened = (features.astype(np.float64) - gate.mean) @ gate.whiten
    expected = ((whitened[:, None, :] - gate.class_means[None]) ** 2).sum(axis=2).min(axis=1)
    np.testing.assert_allclose(gate.distance(features), expected, rtol=1e-5)
    alone = np.concatenate([gate.distance(features[i : i + 1]) for i in range(len(features))])
    np.testing.assert_allclose(alone, expected, rtol=1e-5)
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        np.testing.assert_allclose(gate.distance(features), expected, rtol=1e-5)


def test_the_feature_distance_is_the_formula_to_float32_rounding_in_any_batch(
    fitted: tuple[ood.OODGate, np.random.Generator],
) -> None:
    """The distance's projection is a float32 BLAS product, summed in BLAS's order, not the formula's."""
    gate, _ = fitted
    rng = np.random.default_rng(13)
    features = (CENTRES[rng.integers(0, 7, 40)] + rng.normal(0, 1.5, (40, CENTRES.shape[1]))).astype(np.float32)
    _assert_distances_are_the_formula(gate, features)


def test_the_feature_distance_at_the_served_size_is_the_formula_alone_and_in_a_batch() -> None:
    """The served gate's shape (1280 pooled features, 512 components, the map float16 as stored), where
    OpenBLAS blocks the product and may split it over threads."""
    rng = np.random.default_rng(14)
    k, d = 1280, 512
    arrays = {
        "mean": rng.normal(0, 1, k).astype(np.float32),
        "whiten": (rng.normal(0, 1, (k, d)) / np.sqrt(k)).astype(np.float16),
        "class_means": rng.normal(0, 1, (7, d)).astype(np.float32),
        "colour_mean": np.zeros(9, np.float32),
        "colour_whiten": np.eye(9, dtype=np.float32),
    }
    features = rng.normal(0, 1.5, (8, k)).astype(np.float32)
    _assert_distances_are_the_formula(ood.OODGate.from_arrays(arrays, {}), features)
