"""Sealed results: a ``result`` kind of case blob holds a result's findings about the patient (label,
probabilities, confidence, uncertainty, referral and its reasons, out-of-distribution reasons, the
Grad-CAM class); their columns in ``results`` become NULL once sealed (core/results.py).

- ``ood_reasons`` and ``referral_reasons`` become nullable, and the CHECK constraint accepts a row
  whose findings are all NULL (sealed, or shredded by erasure) besides the plain shapes of before.
  Rows written before keep their plain findings until the sweeper seals them (it needs the key file,
  which migrations do not have); a partial index finds those, built ``CONCURRENTLY`` before the
  rest (migrations/online_indexes.py), so that it blocks no write to ``results`` for the build.
- The CHECK constraints of ``results`` and of ``case_blobs`` (a ``result`` kind) are replaced online
  (migrations/online_checks.py): a plain ``ADD CONSTRAINT`` held each table against reads and writes
  while it checked every row.
- ``outcome_tallies``: field performance as a case-free aggregate (model, model's answer, referral,
  confirmed diagnosis, count), filled from the confirmed outcomes stored so far. A case's confirmed
  outcome now goes when the case is erased or purged; the tally keeps what it counted.
- Cases purged before this revision kept their result: erasure now shreds the findings, so theirs
  are emptied here, and their confirmed outcomes (diagnoses too) removed, after they were counted.

Downgrade: the schema before cannot hold a result without findings. Results of purged cases go (the
code before showed none for a purged case that had none); while a succeeded case's result is
sealed, the downgrade refuses (it cannot unseal without the keys). It refuses too while the tally
counts anything: erasure and purge keep only the tally of a case's confirmed outcome, so for those
cases it is the only record, and the schema before has no place for it.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 09:00:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from migrations import online_checks, online_indexes

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FINDINGS = (
    "label",
    "probabilities",
    "confidence",
    "uncertainty",
    "referral",
    "referral_reasons",
    "ood_reasons",
    "gradcam_class",
)
PLAIN_SHAPES = (
    "(outcome = 'diagnosis' AND label IS NOT NULL AND probabilities IS NOT NULL AND confidence IS NOT NULL"
    " AND uncertainty IS NOT NULL AND referral IS NOT NULL AND ood_reasons = '[]'::jsonb)"
    " OR (outcome = 'out_of_distribution' AND label IS NULL AND probabilities IS NULL AND confidence IS NULL"
    " AND uncertainty IS NULL AND referral IS NULL AND referral_reasons = '[]'::jsonb AND gradcam_class IS NULL"
    " AND jsonb_typeof(ood_reasons) = 'array' AND ood_reasons <> '[]'::jsonb)"
)
OUTCOME_FIELDS = (
    f"(ood_reasons IS NOT NULL AND referral_reasons IS NOT NULL AND ({PLAIN_SHAPES}))"
    " OR (" + " AND ".join(f"{name} IS NULL" for name in FINDINGS) + ")"
)
RESULTS = sa.table("results", sa.column("case_id"), *(sa.column(name) for name in FINDINGS))
CASES = sa.table("cases", sa.column("id"), sa.column("status"))
CONFIRMED = sa.table("confirmed_outcomes", sa.column("case_id"))


# the downgrade's two, in its own transaction (migrations/online_checks.py)
def _blob_kinds(kinds: str) -> None:
    op.drop_constraint(op.f("ck_case_blobs_kind"), "case_blobs", type_="check")
    op.create_check_constraint(op.f("ck_case_blobs_kind"), "case_blobs", f"kind IN ({kinds})")


def _outcome_fields(condition: str) -> None:
    op.drop_constraint(op.f("ck_results_outcome_fields"), "results", type_="check")
    op.create_check_constraint(op.f("ck_results_outcome_fields"), "results", condition)


def upgrade() -> None:
    online_indexes.build({"ix_results_plain": "ON results (case_id) WHERE ood_reasons IS NOT NULL"})
    online_checks.replace(
        {
            "ck_case_blobs_kind": ("case_blobs", "kind IN ('image', 'heatmap', 'client_ref', 'result')"),
            "ck_results_outcome_fields": ("results", OUTCOME_FIELDS),
        }
    )
    for name in ("ood_reasons", "referral_reasons"):
        op.alter_column("results", name, existing_type=postgresql.JSONB(astext_type=sa.Text()), nullable=True)

    op.create_table(
        "outcome_tallies",
        sa.Column("model_id", sa.String(length=128), nullable=False),
        sa.Column("predicted", sa.String(length=24), nullable=False),
        sa.Column("referral", sa.Boolean(), nullable=False),
        sa.Column("truth", sa.String(length=16), nullable=False),
        sa.Column("count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("model_id", "predicted", "referral", "truth", name=op.f("pk_outcome_tallies")),
    )
    op.execute(
        "INSERT INTO outcome_tallies (model_id, predicted, referral, truth, count)"
        " SELECT r.model_id,"
        " CASE WHEN r.outcome = 'diagnosis' THEN r.label ELSE 'out_of_distribution' END,"
        " CASE WHEN r.outcome = 'diagnosis' THEN r.referral ELSE false END,"
        " o.diagnosis, count(*)"
        " FROM confirmed_outcomes o JOIN results r ON r.case_id = o.case_id"
        " GROUP BY 1, 2, 3, 4"
    )
    purged = sa.select(CASES.c.id).where(CASES.c.status == "purged")
    op.execute(sa.update(RESULTS).where(RESULTS.c.case_id.in_(purged)).values(dict.fromkeys(FINDINGS)))
    op.execute(sa.delete(CONFIRMED).where(CONFIRMED.c.case_id.in_(purged)))


def downgrade() -> None:
    bind = op.get_bind()
    sealed = bind.scalar(
        sa.text(
            "SELECT count(*) FROM results JOIN cases ON cases.id = results.case_id"
            " WHERE results.ood_reasons IS NULL AND cases.status <> 'purged'"
        )
    )
    if sealed:
        raise RuntimeError(
            f"{sealed} results are sealed; the schema before revision 0009 holds findings in plain text only. "
            "Downgrading would lose them: restore a backup taken before the upgrade instead"
        )
    counted = bind.scalar(sa.text("SELECT count(*) FROM outcome_tallies"))
    if counted:
        raise RuntimeError(
            f"{counted} outcome tallies are stored; the schema before revision 0009 has no place for them, and for "
            "erased cases they are the only record of the confirmed outcome. Downgrading would lose them: restore "
            "a backup taken before the upgrade instead"
        )
    op.execute("DELETE FROM results WHERE ood_reasons IS NULL")
    op.execute("DELETE FROM case_blobs WHERE kind = 'result'")
    op.drop_table("outcome_tallies")
    op.drop_index("ix_results_plain", table_name="results")
    _outcome_fields(PLAIN_SHAPES)
    for name in ("ood_reasons", "referral_reasons"):
        op.alter_column("results", name, existing_type=postgresql.JSONB(astext_type=sa.Text()), nullable=False)
    _blob_kinds("'image', 'heatmap', 'client_ref'")
