"""registry/promotion.py: the rule, and promotion by it in a real PostgreSQL (the vandal drill
included; its digits and candidates are registry_fixtures.py's).
"""

from __future__ import annotations

import json

import pytest
import torch
from registry_fixtures import SHIPPED, honest_sets, promotions, sha, write

from registry import promotion

# --- the rule ----------------------------------------------------------------------------------


def test_sign_test_is_the_exact_binomial_tail():
    assert promotion.sign_test(5, 5) == 1 / 32
    assert promotion.sign_test(0, 7) == promotion.sign_test(3, 0) == 1.0
    assert promotion.sign_test(9, 10) == pytest.approx(11 / 1024)
    assert promotion.sign_test(5, 10) == pytest.approx(638 / 1024)


def comparison(
    name: str, only_live: int, only_candidate: int, primary=False, sevens_lost=0, losses=(None,) * 4
):
    """A set of 1,000 drawings, 100 per digit; *sevens_lost* 7s read right by the live model
    only, and no 7 by the candidate only."""
    overall = promotion.Paired(
        1000, 950, 950 - only_live + only_candidate, only_live, only_candidate
    )
    by_digit = {d: promotion.Paired(100, 95, 95, 0, 0) for d in range(10)}
    by_digit[7] = promotion.Paired(100, 95, 95 - sevens_lost, sevens_lost, 0)
    return promotion.SetComparison(name, primary, overall, by_digit, *losses)


def test_calibration_tempers_a_model_surer_than_it_is_right():
    labels = torch.arange(10).repeat(100)
    right = torch.full((1000, 10), -20.0)
    right[torch.arange(1000), labels] = 0.0  # sure of every answer...
    right[::10] = right[::10].roll(1, dims=1)  # ...and wrong on one in ten
    temperature = promotion.calibrate(torch.log_softmax(right, 1), labels)
    assert temperature > 2  # its confidence tempered
    tempered = promotion.calibrated_loss(torch.log_softmax(right, 1), labels, temperature)
    raw = float(torch.nn.functional.nll_loss(torch.log_softmax(right, 1), labels))
    assert tempered < raw / 3  # 0.54 against 2.0
    assert promotion.calibrate(torch.empty((0, 10)), torch.empty(0, dtype=torch.long)) == 1.0


def test_the_rule_needs_better_feedback_and_no_loss_beyond_the_noise():
    rest = [comparison("MNIST test", 10, 9), comparison("held-out pen writers", 3, 5)]
    assert promotion.refusals([comparison("held-out feedback", 2, 3, primary=True), *rest]) == []
    # Not strictly better on the people's drawings.
    (reason,) = promotion.refusals([comparison("held-out feedback", 3, 3, primary=True), *rest])
    assert reason.startswith("not better on held-out feedback")
    # As many, and the true labels likelier once each model is calibrated: better. Surer
    # before calibration is not enough.
    tied = comparison("held-out feedback", 1, 1, primary=True, losses=(0.02, 0.04, 0.05, 0.04))
    assert promotion.refusals([tied, *rest]) == []
    tied = comparison("held-out feedback", 1, 1, primary=True, losses=(0.05, 0.02, 0.04, 0.04))
    (reason,) = promotion.refusals([tied, *rest])
    assert reason.endswith("calibrated mean loss 0.0400 against 0.0400")
    # A loss on MNIST beyond the noise (15 to 5: p = 0.021 < 0.05) overall; within it
    # (13 to 6: p = 0.084), not.
    better = comparison("held-out feedback", 0, 5, primary=True)
    (reason,) = promotion.refusals([better, comparison("MNIST test", 15, 5)])
    assert reason.startswith("worse on MNIST test: 15 only the live model")
    assert promotion.refusals([better, comparison("MNIST test", 13, 6)]) == []
    # One digit: 8 of its drawings lost, none gained (p = 0.0039 < 0.005), though overall the
    # loss is within the noise; 7 lost (p = 0.0078) is within it.
    (reason,) = promotion.refusals([better, comparison("MNIST test", 13, 6, sevens_lost=8)])
    assert reason.startswith("worse on the 7s of MNIST test: 8 only the live model")
    assert promotion.refusals([better, comparison("MNIST test", 13, 6, sevens_lost=7)]) == []
    # No held-out feedback: nothing to judge by.
    assert promotion.refusals(rest)[0] == "no held-out feedback to judge the candidate by"


# --- promotion, the vandal drill ---------------------------------------------------------------


@pytest.mark.parametrize("vandal", ["sevens", "random"])
def test_vandal_drill_candidate_refused_and_live_model_unchanged(
    server, live_file, vandal_candidates, vandal, tmp_path, capsys
):
    """300 answers labelling every 7 as 1 (or random labels): the candidate trained on them is
    refused, the live version and the model file stay, and train.py would exit EXIT_REFUSED."""
    weights, sets = vandal_candidates[vandal]
    before = live_file.read_bytes(), live_file.with_suffix(".json").read_bytes()
    info = {"sources": ["mnist", "pen", "feedback"], "vandal drill": vandal}

    result = promotion.promote(
        write(tmp_path / "candidate.pth", weights), info, sets, conninfo=server.url, out=live_file
    )

    assert not result.promoted and result.exit_code == promotion.EXIT_REFUSED
    assert result.live_sha256 == sha(SHIPPED.read_bytes()) != result.candidate_sha256
    assert (live_file.read_bytes(), live_file.with_suffix(".json").read_bytes()) == before
    assert promotions(server) == [("initial", result.live_sha256)]
    printed = capsys.readouterr().out
    assert result.table in printed and "REFUSED" in printed
    if vandal == "sevens":
        assert any(r.startswith("worse on the 7s of MNIST test") for r in result.reasons)
    with server.connect() as conn:  # recorded as a version all the same
        assert conn.execute(
            "SELECT info FROM model_versions WHERE sha256 = %s", (result.candidate_sha256,)
        ).fetchone() == (info,)


def test_better_candidate_promoted_its_weights_written(
    server, live_file, vandal_candidates, drill, tmp_path
):
    """The live model is the one trained on the vandal's sevens; the shipped model, better on
    people's honest drawings and no worse elsewhere, is promoted."""
    vandal = vandal_candidates["sevens"][0]
    write(live_file, vandal)
    info = json.loads(SHIPPED.with_suffix(".json").read_text())

    result = promotion.promote(
        SHIPPED, info, honest_sets(drill), conninfo=server.url, out=live_file
    )

    assert result.promoted and result.exit_code == 0, result.table
    assert (result.live_sha256, result.candidate_sha256) == (sha(vandal), sha(SHIPPED.read_bytes()))
    assert promotions(server) == [("initial", sha(vandal)), ("promote", result.candidate_sha256)]
    assert live_file.read_bytes() == SHIPPED.read_bytes()
    written = json.loads(live_file.with_suffix(".json").read_text())
    assert written == {**info, "sha256": result.candidate_sha256}
    assert "PROMOTED" in result.table
    with server.connect() as conn:
        (report,) = conn.execute(
            "SELECT report FROM model_promotions WHERE action = 'promote'"
        ).fetchone()
    feedback_figures = report["sets"][0]
    assert feedback_figures["name"] == promotion.PRIMARY
    assert feedback_figures["only_candidate"] > feedback_figures["only_live"]
