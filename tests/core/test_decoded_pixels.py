"""A batch is bounded by the pixels its images decode to: for a JPEG those of the draft-mode decode the
worker asks for, for other formats the declared size (core.case_claims.decoded_pixels agrees with
ml.images.decode)."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from sqlalchemy import select

from core import case_claims
from core.db import session_scope
from core.models import Case
from ml.images import ImageLimits, decode


@pytest.mark.parametrize(
    ("fmt", "width", "height"),
    [("JPEG", 4000, 3000), ("JPEG", 200, 150), ("JPEG", 1024, 768), ("JPEG", 9000, 6000), ("PNG", 4500, 4500)],
)
def test_counted_pixels_are_the_decoded_ones(make_key, settings, store_case, fmt: str, width: int, height: int) -> None:  # type: ignore[no-untyped-def]
    tenant = make_key("clinic")
    case_id = store_case(tenant, b"not decoded here", fmt=fmt, width=width, height=height)
    with session_scope(settings) as session:
        reduced = case_claims.decoded_pixels(settings.overlay_max_side)
        counted = session.scalar(select(reduced).where(Case.id == case_id))
        declared = session.scalar(select(case_claims.decoded_pixels(None)).where(Case.id == case_id))
    assert declared == width * height
    if fmt == "JPEG":
        out = io.BytesIO()
        Image.new("RGB", (width, height), (120, 90, 80)).save(out, "JPEG", quality=50)
        limits = ImageLimits(min_side=8, max_pixels=100_000_000)
        decoded = decode(out.getvalue(), limits, reduce_to=settings.overlay_max_side).image
        assert counted == decoded.width * decoded.height
    else:
        assert counted == width * height
