"""Each claim's verdict (supported, contradicted, inconclusive) on constructed tables."""

from __future__ import annotations

import pandas as pd
import pytest

from kdrepro.analysis.verdict import best_specific, claim_extended, claim_matched_compute, claim_rankings, judge

SPECIFIC = ["cwd", "dist"]


def _table(protocol: str, means: dict[str, float], noise: float = 0.002, multiplier: float = 1.0, seeds: int = 3):
    """Runs whose seed effects are shared by every method (common random numbers) plus a small wobble."""
    rows = []
    for seed in range(seeds):
        for index, (method, mean) in enumerate(means.items()):
            wobble = noise * (((seed + index) % 3) - 1)
            rows.append({"protocol": protocol, "method": method, "multiplier": multiplier, "seed": seed,
                         "miou": mean + 0.01 * seed + wobble})
    return pd.DataFrame(rows)


def test_rankings_supported_when_a_specific_advantage_vanishes_under_compute_matching():
    runs = pd.concat([_table("iter_matched", {"kd": 0.20, "cwd": 0.25, "dist": 0.21, "none": 0.15}),
                      _table("compute_matched", {"kd": 0.22, "cwd": 0.19, "dist": 0.21, "none": 0.17})])
    claim = claim_rankings(runs, SPECIFIC)
    assert claim["verdict"] == "supported"
    assert "cwd" in claim["figures"]["specific_advantage_lost"]


def test_a_reversed_pair_is_reported_once():
    runs = pd.concat([_table("iter_matched", {"kd": 0.20, "cwd": 0.25}),
                      _table("compute_matched", {"kd": 0.25, "cwd": 0.20})])
    claim = claim_rankings(runs, SPECIFIC)
    assert claim["verdict"] == "supported"
    assert claim["figures"]["flips"] == ["cwd>kd iteration-matched, kd>cwd compute-matched"]


def test_rankings_contradicted_when_every_significant_order_holds():
    runs = pd.concat([_table("iter_matched", {"kd": 0.20, "cwd": 0.25, "none": 0.15}),
                      _table("compute_matched", {"kd": 0.21, "cwd": 0.26, "none": 0.16})])
    assert claim_rankings(runs, SPECIFIC)["verdict"] == "contradicted"


def test_rankings_inconclusive_inside_the_noise():
    runs = pd.concat([_table("iter_matched", {"kd": 0.20, "cwd": 0.201}, noise=0.02),
                      _table("compute_matched", {"kd": 0.201, "cwd": 0.20}, noise=0.02)])
    assert claim_rankings(runs, SPECIFIC)["verdict"] == "inconclusive"


@pytest.mark.parametrize(
    ("means", "verdict"),
    [({"kd": 0.25, "fitnet": 0.22, "cwd": 0.20, "dist": 0.21}, "supported"),
     ({"kd": 0.20, "fitnet": 0.19, "cwd": 0.25, "dist": 0.21}, "contradicted")],
)
def test_matched_compute_claim(means, verdict):
    claim = claim_matched_compute(_table("compute_matched", means), SPECIFIC)
    assert claim["verdict"] == verdict
    assert claim["figures"]["best_specific"] == max(SPECIFIC, key=means.get)
    assert claim["figures"]["canonical"] == max(("kd", "fitnet"), key=means.get)


def test_matched_compute_inconclusive_inside_the_noise():
    claim = claim_matched_compute(_table("compute_matched", {"kd": 0.20, "cwd": 0.201}, noise=0.03), SPECIFIC)
    assert claim["verdict"] == "inconclusive"
    assert "inside the noise" in claim["evidence"]


def _extended(kd: float, none: float, multiplier: float = 4.0):
    return pd.concat([_table("extended", {"kd": kd, "none": none}, multiplier=multiplier),
                      _table("extended", {"kd": kd - 0.05, "none": none - 0.05}, multiplier=2.0)])


def test_extended_claim_states():
    assert claim_extended(_extended(0.30, 0.25), teacher_miou_pct=32.0)["verdict"] == "supported"
    assert claim_extended(_extended(0.25, 0.30), teacher_miou_pct=32.0)["verdict"] == "contradicted"
    assert claim_extended(_extended(0.20, 0.15), teacher_miou_pct=40.0)["verdict"] == "contradicted"  # far from it
    noisy = pd.concat([_table("extended", {"kd": 0.30, "none": 0.299}, noise=0.03, multiplier=4.0)])
    assert claim_extended(noisy, teacher_miou_pct=32.0)["verdict"] == "inconclusive"
    assert claim_extended(_extended(0.30, 0.25), teacher_miou_pct=32.0)["figures"]["multiplier"] == 4.0


def test_best_specific_is_chosen_from_the_compute_matched_means():
    runs = _table("compute_matched", {"cwd": 0.20, "dist": 0.23, "kd": 0.30})
    assert best_specific(runs, SPECIFIC) == "dist"


def test_judge_returns_three_claims_with_one_of_three_verdicts():
    runs = _table("iter_matched", {"kd": 0.2, "none": 0.1})
    claims = judge(runs, SPECIFIC, None)
    assert [c["id"] for c in claims] == ["a", "b", "c"]
    assert {c["verdict"] for c in claims} <= {"supported", "contradicted", "inconclusive"}
