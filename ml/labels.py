"""The seven HAM10000 diagnostic classes, their display names and clinical grouping.

The order of ``CLASSES`` is the order of every model output in dermq; manifests record it too, and
loading refuses a model whose class order differs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Group(enum.StrEnum):
    """Clinical grouping used by the referral rule."""

    MALIGNANT = "malignant"
    PREMALIGNANT = "premalignant"
    BENIGN = "benign"


@dataclass(frozen=True, slots=True)
class Diagnosis:
    code: str
    name: str
    group: Group


DIAGNOSES: tuple[Diagnosis, ...] = (
    Diagnosis("akiec", "Actinic keratosis / intraepithelial carcinoma (Bowen's disease)", Group.PREMALIGNANT),
    Diagnosis("bcc", "Basal cell carcinoma", Group.MALIGNANT),
    Diagnosis("bkl", "Benign keratosis-like lesion", Group.BENIGN),
    Diagnosis("df", "Dermatofibroma", Group.BENIGN),
    Diagnosis("mel", "Melanoma", Group.MALIGNANT),
    Diagnosis("nv", "Melanocytic nevus", Group.BENIGN),
    Diagnosis("vasc", "Vascular lesion", Group.BENIGN),
)

CLASSES: tuple[str, ...] = tuple(d.code for d in DIAGNOSES)
BY_CODE: dict[str, Diagnosis] = {d.code: d for d in DIAGNOSES}
NUM_CLASSES = len(CLASSES)

#: Classes whose presence should put a case in front of a clinician: malignant and pre-malignant.
CONCERNING: tuple[str, ...] = tuple(d.code for d in DIAGNOSES if d.group is not Group.BENIGN)


def index_of(code: str) -> int:
    """Position of a class code in model outputs; raises ``KeyError`` for an unknown code."""
    try:
        return CLASSES.index(code)
    except ValueError:
        raise KeyError(f"unknown HAM10000 class {code!r}; expected one of {', '.join(CLASSES)}") from None
