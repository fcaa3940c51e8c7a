"""A process whose period-key folder is not the shared volume: it never makes keys of its own there. A
missing folder is not created (its key would be that process's alone, lost when it goes), and an empty
one (a container's image makes the folder, so a pod without the volume has one) gets no first key once
the database holds data sealed under period keys; both answer 503 ``period_keys_unavailable``."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import Settings
from core.errors import ServiceUnavailable
from core.period_keys import PeriodKeys
from tests.core.test_period_keys import Site, site  # noqa: F401  (site: the fixture)

pytestmark = pytest.mark.usefixtures("database")


def test_a_missing_folder_is_refused_and_not_created(settings: Settings, tmp_path: Path) -> None:
    folder = tmp_path / "not-mounted"
    with pytest.raises(ServiceUnavailable, match="does not exist: is DERMQ_PERIOD_KEY_DIR's volume mounted") as no:
        PeriodKeys(folder, settings).ensure("2026-01")
    assert no.value.status == 503 and no.value.code == "period_keys_unavailable"
    assert not folder.exists()


def test_the_api_without_the_shared_folder_answers_503_and_makes_no_key(  # type: ignore[no-untyped-def]
    site: Site,  # noqa: F811
    tmp_path: Path,
    jpeg_bytes: bytes,
) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    files = {"image": ("x.jpg", jpeg_bytes, "image/jpeg")}
    with TestClient(create_app(site.settings)) as http:  # the shared folder: the first key of all is made
        assert http.post("/v1/cases", headers=site.tenant.headers, files=files).status_code == 202
    empty = tmp_path / "image-made-folder"
    empty.mkdir(mode=0o700)
    for folder in (tmp_path / "not-mounted", empty):
        elsewhere = site.settings.model_copy(update={"period_key_dir": folder})
        with TestClient(create_app(elsewhere)) as http:
            refused = http.post("/v1/cases", headers=site.tenant.headers, files=files)
        assert refused.status_code == 503, refused.text
        assert refused.json()["code"] == "period_keys_unavailable"
        assert "DERMQ_PERIOD_KEY_DIR" in refused.json()["detail"] and refused.headers["Retry-After"]
        assert not folder.exists() or list(folder.iterdir()) == [], f"{folder.name} got a key of its own"


def test_reading_a_case_without_its_period_keys_is_a_503_that_names_the_folder_not_a_500(  # type: ignore[no-untyped-def]
    site: Site,  # noqa: F811
    tmp_path: Path,
    jpeg_bytes: bytes,
) -> None:
    # A process without the shared volume (or after the folder was lost: docs/OPERATIONS.md, "Back up
    # and restore") read a case sealed under a period key with a 500 internal_error, where its intake
    # answered 503 period_keys_unavailable: the operator's alert (DermqApiHigh5xxRate) named no cause.
    from fastapi.testclient import TestClient

    from api.app import create_app

    files = {"image": ("x.jpg", jpeg_bytes, "image/jpeg")}
    with TestClient(create_app(site.settings)) as http:
        created = http.post("/v1/cases", headers=site.tenant.headers, files=files, data={"client_ref": "MRN-1"})
        assert created.status_code == 202, created.text
    case_id = created.json()["id"]
    folder = site.settings.period_key_folder
    assert folder is not None
    (key,) = folder.glob("*.json")
    key.chmod(0o644)  # a period key file open to others: never read
    empty = tmp_path / "image-made-folder"
    empty.mkdir(mode=0o700)
    for elsewhere in (site.settings, site.settings.model_copy(update={"period_key_dir": empty})):
        with TestClient(create_app(elsewhere)) as http:
            for path in (f"/v1/cases/{case_id}", "/v1/cases"):
                read = http.get(path, headers=site.tenant.headers)
                assert read.status_code == 503, (path, read.text)
                assert read.json()["code"] == "period_keys_unavailable" and read.headers["Retry-After"]
                assert "DERMQ_PERIOD_KEY_DIR" in read.json()["detail"] and "MRN-1" not in read.text
