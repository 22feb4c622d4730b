"""registry/promotion.py: the rule, and promotion by it in a real PostgreSQL (the vandal drill
included; its digits and candidates are registry_fixtures.py's); the answers a candidate gave in
shadow counted with the held-out feedback.
"""

from __future__ import annotations

import io
import json
import uuid

import pytest
import torch
from registry_fixtures import SHIPPED, honest_sets, promotions, sha, write

import db
import feedback
from registry import promotion, store

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


def test_rule_1_pools_the_shadow_answers_with_the_held_out_feedback():
    rest = [comparison("MNIST test", 10, 9)]
    tied = comparison("held-out feedback", 2, 2, primary=True)
    (reason,) = promotion.refusals([tied, *rest])
    assert reason.startswith("not better on held-out feedback: 2 drawings")
    assert promotion.refusals([tied, comparison(promotion.SHADOW, 0, 3, primary=True), *rest]) == []
    (reason,) = promotion.refusals([tied, comparison(promotion.SHADOW, 3, 1, primary=True), *rest])
    assert reason.startswith(
        "not better on held-out feedback and shadow answers: 3 drawings only the candidate reads"
        " right, 5 only the live model"
    )
    # No held-out feedback: the shadow answers alone.
    empty = promotion.SetComparison(promotion.PRIMARY, True, promotion.Paired(0, 0, 0, 0, 0))
    assert promotion.refusals([empty, comparison(promotion.SHADOW, 0, 3, primary=True)]) == []


def test_rule_2_guards_each_of_rule_1s_sets_when_it_pools_them():
    """Far better on the held-out feedback does not hide a loss beyond the noise on the shadow
    answers (6 against 0: p = 0.016), nor the other way round."""
    better = comparison("held-out feedback", 0, 20, primary=True)
    (reason,) = promotion.refusals([better, comparison(promotion.SHADOW, 6, 0, primary=True)])
    assert reason.startswith("worse on shadow answers: 6 only the live model reads right")
    worse = comparison(promotion.PRIMARY, 6, 0, primary=True)
    (reason,) = promotion.refusals([worse, comparison(promotion.SHADOW, 0, 20, primary=True)])
    assert reason.startswith("worse on held-out feedback: 6 only the live model reads right")


# --- the shadow answers, stored ----------------------------------------------------------------


def same_answers_other_version() -> bytes:
    """The shipped model with each output's biases raised alike: the same answers to every
    drawing (softmax ignores a constant), another version."""
    state = torch.load(SHIPPED, weights_only=True)
    for key in ("members.0.classifier.2.bias", "members.1.classifier.2.bias"):
        state[key] = state[key] + 1.0
    state["trajectory.head.1.bias"] = state["trajectory.head.1.bias"] + 1.0
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def store_shadow_answers(server, live: str, shadow: str, answers, **kwargs) -> None:
    """Answers as the app stores them: (live digit, the shadow's digit, true label)."""
    db.configure(server.url)
    for live_digit, shadow_digit, label in answers:
        db.log_prediction(
            live_digit, label, 0.9, model=store.version_name(live),
            shadow_model=store.version_name(shadow), shadow_digit=shadow_digit,
            shadow_confidence=0.8, **kwargs,
        )  # fmt: skip


def submission(held_out: bool, start: int = 0) -> uuid.UUID:
    """A submission id held out of training (feedback.is_held_out), or not."""
    ids = (uuid.UUID(int=n) for n in range(start, start + 100))
    return next(i for i in ids if feedback.is_held_out(i, 0) == held_out)


def test_the_shadow_answers_are_those_of_the_candidate_beside_the_live_model_counted_once(
    server,
):
    live, candidate, other = (sha(bytes([n])) for n in range(3))
    # Only the candidate right on each drawing ...
    store_shadow_answers(server, live, candidate, [(1, 7, 7)])
    store_shadow_answers(server, live, candidate, [(2, 8, 8)], submission_id=submission(False))
    store_shadow_answers(
        server, live, candidate, [(3, 9, 9)], submission_id=submission(True), drawing=None
    )
    # ... but where the drawing of a held-out submission was kept (the held-out feedback may
    # hold it), and the answers beside another live model or of another shadow.
    drawing = db.Drawing([[[140.0, 40.0], [140.0, 240.0]]], 280, 18.0, bytes(784))
    store_shadow_answers(
        server, live, candidate, [(4, 5, 5)], submission_id=submission(True, 100), drawing=drawing
    )
    store_shadow_answers(server, other, candidate, [(6, 6, 6)])
    store_shadow_answers(server, live, other, [(6, 6, 6)])
    with server.connect() as conn:
        found = promotion.shadow_comparison(conn, live, candidate)
    assert (found.name, found.primary) == (promotion.SHADOW, True)
    assert found.overall == promotion.Paired(3, 0, 3, 0, 3)
    assert sorted(found.by_digit) == [7, 8, 9]
    with server.connect() as conn:
        assert promotion.shadow_comparison(conn, candidate, live) is None


@pytest.mark.parametrize("better", [True, False], ids=["better", "worse"])
def test_the_shadow_answers_decide_a_candidate_the_evaluation_sets_cannot_tell_apart(
    server, live_file, drill, tmp_path, better
):
    """A candidate that reads every drawing of the evaluation sets as the live model does, and no
    held-out feedback: refused for want of evidence; with its shadow answers, promoted if they
    show it better, refused if they show it worse."""
    candidate = write(tmp_path / "candidate.pth", same_answers_other_version())
    sets = honest_sets(drill)
    sets[promotion.PRIMARY] = promotion.EvalSet(
        torch.empty((0, 1, 28, 28)), torch.empty(0, dtype=torch.int64), True
    )
    live = sha(SHIPPED.read_bytes())
    result = promotion.promote(candidate, {}, sets, conninfo=server.url, out=live_file)
    assert result.reasons == (f"no {promotion.PRIMARY} to judge the candidate by",)

    answers = [(1, 7, 7), (2, 3, 3), (4, 4, 4), (5, 6, 6), (8, 9, 9), (0, 1, 1)]
    if not better:
        answers = [(shadow, live_digit, label) for live_digit, shadow, label in answers]
    store_shadow_answers(server, live, sha(candidate.read_bytes()), answers)
    result = promotion.promote(candidate, {}, sets, conninfo=server.url, out=live_file)

    assert result.promoted == better, result.table
    assert "shadow answers" in result.table
    if better:
        assert promotions(server)[-1] == ("promote", sha(candidate.read_bytes()))
    else:
        (reason,) = result.reasons
        assert reason.startswith("not better on shadow answers: 0 drawings only the candidate")


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
