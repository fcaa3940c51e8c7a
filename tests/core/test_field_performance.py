"""The field figures from the tally's cells: a cell of many alike confirmed cases counts as that
many cases, so a report's cost grows with the cells (a few hundred) and not with the years of
confirmed cases behind them, and gives the figures the cases one by one give."""

from __future__ import annotations

from core.outcomes import Confirmed, field_performance

CELLS = [  # (answer, referral, truth, cases)
    ("mel", True, "mel", 40),
    ("nv", False, "mel", 9),
    (None, None, "mel", 3),  # turned away by the gate
    ("nv", False, "nv", 300),
    ("mel", True, "nv", 25),
    ("bcc", True, "bcc", 12),
    ("bkl", False, "bcc", 2),
]


def test_cells_of_alike_cases_give_the_figures_of_the_cases_one_by_one() -> None:
    cells = [Confirmed("m", label, referral, truth, count=n) for label, referral, truth, n in CELLS]
    cases = [Confirmed("m", label, referral, truth) for label, referral, truth, n in CELLS for _ in range(n)]
    assert field_performance(cells) == field_performance(cases)
    figures = field_performance(cells)["m"]
    assert figures["confirmed"] == 391 and figures["out_of_distribution"] == 3
    assert figures["classes"]["mel"]["sensitivity"]["successes"] == 40
    assert figures["classes"]["mel"]["sensitivity"]["trials"] == 52
    assert figures["classes"]["mel"]["ppv"]["trials"] == 65
    referral = figures["referral_sensitivity"]
    assert (referral["successes"], referral["trials"]) == (52, 66)
