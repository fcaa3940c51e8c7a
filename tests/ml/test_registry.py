"""ml.registry: verified loading and refusal of tampered or malformed entries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ml import registry
from ml.predictor import Predictor


def test_round_trip(tiny_entry: Path) -> None:
    manifest = registry.read_manifest(tiny_entry)
    assert manifest["files"]["weights"]["sha256"] == registry.sha256_file(tiny_entry / "weights.safetensors")
    predictor = Predictor.load(tiny_entry, device="cpu")
    assert predictor.info.model_id == "tiny-v1"
    assert predictor.info.weights_sha256 == manifest["files"]["weights"]["sha256"]


def test_one_changed_byte_is_refused(tiny_entry: Path) -> None:
    weights = tiny_entry / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(registry.IntegrityError, match="integrity check"):
        Predictor.load(tiny_entry, device="cpu")


def test_missing_weights_are_reported(tiny_entry: Path) -> None:
    (tiny_entry / "weights.safetensors").unlink()
    with pytest.raises(registry.RegistryError, match="missing"):
        Predictor.load(tiny_entry, device="cpu")


def test_manifest_cannot_point_outside_the_entry(tiny_entry: Path, tmp_path: Path) -> None:
    manifest = registry.read_manifest(tiny_entry)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(tiny_entry / "weights.safetensors", outside)
    manifest["files"]["weights"]["path"] = "../elsewhere.safetensors"
    (tiny_entry / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(registry.RegistryError, match="without a path"):
        Predictor.load(tiny_entry, device="cpu")


def test_class_order_must_match(tiny_entry: Path) -> None:
    manifest = registry.read_manifest(tiny_entry)
    manifest["classes"] = list(reversed(manifest["classes"]))
    (tiny_entry / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(registry.RegistryError, match="class order"):
        Predictor.load(tiny_entry, device="cpu")


@pytest.mark.parametrize("field", ["serving", "architecture"])
def test_a_list_where_the_manifest_needs_an_object_or_a_name_is_a_registry_error(tiny_entry: Path, field: str) -> None:
    # an AttributeError escaped: a worker then failed each case as a crash while classifying, not as a
    # model that did not load (no model_load_failed in its log, and not the clinic's "model not loaded")
    manifest = registry.read_manifest(tiny_entry)
    manifest[field] = []
    (tiny_entry / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(registry.RegistryError, match="lacks or mistypes"):
        Predictor.load(tiny_entry, device="cpu")


def test_not_a_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(registry.RegistryError, match="not valid JSON"):
        registry.read_manifest(tmp_path)
    with pytest.raises(registry.RegistryError, match="no registry entry"):
        registry.resolve(tmp_path / "nope")


def test_pickled_weights_are_never_loaded(tiny_entry: Path) -> None:
    # A pickle with a matching digest is still not safetensors: it is refused, not unpickled.
    import pickle

    weights = tiny_entry / "weights.safetensors"
    weights.write_bytes(pickle.dumps({"conv_stem.weight": [1, 2, 3]}))
    registry.record_file(tiny_entry, "weights", "weights.safetensors")
    with pytest.raises(registry.RegistryError, match="safetensors"):
        Predictor.load(tiny_entry, device="cpu")


def test_entries_lists_good_and_bad_folders(tiny_entry: Path, tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    found = {folder.name: (manifest is not None, error) for folder, manifest, error in registry.entries(tmp_path)}
    assert found["tiny-v1"] == (True, None)
    assert found["broken"][0] is False and "manifest" in found["broken"][1]


@pytest.mark.parametrize(
    "record",
    [{"path": "..", "sha256": "0" * 64}, {"path": "weights.safetensors"}, ["weights.safetensors"], {"sha256": "0"}],
)
def test_a_malformed_file_record_is_a_failed_check_not_a_crash(tiny_entry: Path, record: object) -> None:
    manifest = json.loads((tiny_entry / "manifest.json").read_text())
    manifest["files"]["weights"] = record
    (tiny_entry / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(registry.RegistryError):
        registry.read_verified(tiny_entry, "weights")
    from ml.entry import verify_entry

    failed = [name for name, passed, _ in verify_entry(tiny_entry) if not passed]
    assert failed and failed[0].startswith("sha256")


@pytest.mark.parametrize("artefact", ["manifest", "weights"])
def test_a_file_that_leads_to_a_pipe_is_refused_at_once_not_waited_on(
    tiny_entry: Path, tmp_path: Path, artefact: str
) -> None:
    # A tampered entry whose file is a symlink to a FIFO outside it: reading it would wait for a writer
    # for ever (a worker's model load, and every case waiting on it, hung); it is refused instead.
    import os
    import threading

    fifo = tmp_path / "elsewhere"
    os.mkfifo(fifo)
    name = "manifest.json" if artefact == "manifest" else "weights.safetensors"
    (tiny_entry / name).unlink()
    (tiny_entry / name).symlink_to(fifo)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            Predictor.load(tiny_entry, device="cpu")
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    loading = threading.Thread(target=load, daemon=True)
    loading.start()
    loading.join(timeout=30)
    if loading.is_alive():  # a writer that closes at once ends the read, and the thread with it
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        loading.join(timeout=30)
        pytest.fail("loading the entry waited on the pipe")
    assert len(outcome) == 1 and isinstance(outcome[0], registry.RegistryError)
    assert "not a regular file" in str(outcome[0])


def test_a_file_that_leads_to_a_device_is_refused_before_it_is_read(tiny_entry: Path) -> None:
    # a device is never read: /dev/zero, read whole to hash it, would take the worker's memory first.
    # /dev/null stands in for it here (a regression then fails on its digest, not on this machine's memory)
    weights = tiny_entry / "weights.safetensors"
    weights.unlink()
    weights.symlink_to("/dev/null")
    with pytest.raises(registry.RegistryError, match="not a regular file"):
        registry.read_verified(tiny_entry, "weights")


def test_a_well_formed_manifest_that_changes_the_answer_fails_the_known_answer(
    tiny_entry: Path, fixture_images: dict[str, Path]
) -> None:
    # The digests cover the files, not the manifest they hang from: an edited calibration (or input
    # size, or decision rule) loaded cleanly and served other answers. A worker checks the entry's own
    # known answer once it has loaded the model, before it serves (worker.runtime).
    from ml.entry import check_known_answer, record_verification

    record_verification(tiny_entry, next(iter(fixture_images.values())))
    check_known_answer(tiny_entry, Predictor.load(tiny_entry, device="cpu"))  # as recorded: it serves
    manifest = registry.read_manifest(tiny_entry)
    manifest["decision"]["calibration"] = {"method": "temperature", "temperature": 0.05}  # sharper, well formed
    (tiny_entry / "manifest.json").write_text(json.dumps(manifest))
    edited = Predictor.load(tiny_entry, device="cpu")  # it loads: every file's digest is the record's
    with pytest.raises(registry.KnownAnswerDiffers, match="largest probability difference") as caught:
        check_known_answer(tiny_entry, edited)
    assert caught.value.device == "cpu"
    manifest["verification"]["tolerance"] = 1.0  # the record's own tolerance widened to match: not taken
    (tiny_entry / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(registry.KnownAnswerDiffers):
        check_known_answer(tiny_entry, Predictor.load(tiny_entry, device="cpu"))
    del manifest["verification"]  # the record removed: refused where one is required (production)
    (tiny_entry / "manifest.json").write_text(json.dumps(manifest))
    unrecorded = Predictor.load(tiny_entry, device="cpu")
    check_known_answer(tiny_entry, unrecorded)
    with pytest.raises(registry.RegistryError, match="records no known answer"):
        check_known_answer(tiny_entry, unrecorded, required=True)


def test_a_pinned_manifest_passes_and_one_edited_to_keep_the_known_answer_does_not(tiny_entry: Path) -> None:
    # The known answer cannot see an edit that leaves the verification image's answer as it was: a
    # referral threshold raised refers fewer lesions. A deployment pins the manifest's own digest.
    pinned = registry.manifest_sha256(tiny_entry)
    assert len(pinned) == 64 and pinned == registry.sha256_bytes((tiny_entry / registry.MANIFEST).read_bytes())
    registry.check_pinned(tiny_entry, pinned)
    manifest = registry.read_manifest(tiny_entry)
    manifest["decision"]["referral_threshold"] = 0.9
    (tiny_entry / registry.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(registry.IntegrityError, match="not the pinned one"):
        registry.check_pinned(tiny_entry, pinned)
    registry.check_pinned(tiny_entry, registry.manifest_sha256(tiny_entry))  # pinned anew, after a review


def test_a_loaded_predictor_carries_the_digest_of_the_manifest_bytes_it_parsed(tiny_entry: Path) -> None:
    # The pin was checked against the file and the file read again to load: a manifest replaced in
    # between was served. A load hashes the bytes it parses, and the pin is checked against that digest.
    pinned = registry.manifest_sha256(tiny_entry)
    loaded = Predictor.load(tiny_entry, device="cpu")
    assert loaded.info.manifest_sha256 == pinned
    manifest = registry.read_manifest(tiny_entry)
    manifest["decision"]["referral_threshold"] = 0.9
    (tiny_entry / registry.MANIFEST).write_text(json.dumps(manifest))  # replaced after the load
    registry.check_pinned(tiny_entry, pinned, actual=loaded.info.manifest_sha256)  # what was loaded is pinned
    edited = Predictor.load(tiny_entry, device="cpu")
    assert edited.info.manifest_sha256 == registry.sha256_bytes((tiny_entry / registry.MANIFEST).read_bytes())
    with pytest.raises(registry.IntegrityError, match="not the pinned one"):
        registry.check_pinned(tiny_entry, pinned, actual=edited.info.manifest_sha256)


def test_a_load_checks_every_file_against_the_manifest_it_parsed_not_a_later_one(
    tiny_entry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Other weights, and a manifest recording them, put in place once the load has parsed the (pinned)
    # manifest: the weights were checked against the new manifest, read again, and served under the old one.
    weights = tiny_entry / registry.WEIGHTS
    swapped = tiny_entry.parent / "swapped"
    shutil.copytree(tiny_entry, swapped)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    (swapped / registry.WEIGHTS).write_bytes(bytes(data))
    registry.record_file(swapped, "weights", registry.WEIGHTS)  # a consistent entry, just not the pinned one
    parse = registry.load_manifest

    def parse_then_swap(entry: str | Path) -> tuple[dict[str, object], str]:
        parsed = parse(entry)
        for name in (registry.WEIGHTS, registry.MANIFEST):
            shutil.copy(swapped / name, tiny_entry / name)
        return parsed

    monkeypatch.setattr(registry, "load_manifest", parse_then_swap)
    with pytest.raises(registry.IntegrityError, match="integrity check"):
        Predictor.load(tiny_entry, device="cpu")
