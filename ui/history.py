"""The History page: what the answers stored say about the model, counted by the database
(db.py): accuracy, the confusion matrix, accuracy over time, the newest answers, the CSV, the
model versions that served the app, and the live model against a shadow candidate.

app.py runs this file as a page (st.navigation); tests import it. The database's status is
ui.serving's, imported.
"""

from __future__ import annotations

import logging
from functools import partial

import altair as alt
import pandas as pd
import streamlit as st

import db
import registry.store
from ui.serving import database_status

logger = logging.getLogger("app")

HISTORY_LIMIT = 1_000  # newest answers listed on the History page (the CSV has them all)
ANSWERS_PER_POINT = 50  # History's accuracy over time: one point per so many answers
MAX_DOTS = 200  # ... drawn as dots on the line up to so many points

# widget keys
MODEL_FILTER = "history_model"
TIME_SCALE = "history_time_scale"
PER_ANSWERS = f"per {ANSWERS_PER_POINT} answers"
PER_DAY = "per day"

# The app's role may only insert drawings, never read them: they are exported by the owner.
DRAWINGS_EXPORT = (
    "The drawings behind the answers are not in the CSV: export them with "
    "`python db.py export-drawings drawings.jsonl` (database owner; docs/architecture.md, "
    "*The drawings*)."
)
HISTORY_BUSY = "History unavailable: the database is busy. Try again in a moment."
HISTORY_UNAVAILABLE = "History unavailable: database unreachable. Try again in a moment."
HISTORY_FAILED = "History unavailable: unexpected database error (details in the server log)."
NO_HISTORY = "No feedback stored yet: draw a digit, then press Correct or Submit correction."
UNRECORDED_MODEL = "not recorded"  # how History names the model of rows stored before it was


def history_page() -> None:
    st.title("History")
    try:
        show_versions(show_history())
        show_learning()
        show_shadow_pairs()
    except db.DatabaseBusy as exc:  # healthy but slow: not an outage
        logger.warning("history unavailable: %s", exc)
        st.error(HISTORY_BUSY)
        return
    except db.DatabaseUnavailable as exc:
        database_status().ready = False
        logger.warning("history unavailable: %s", exc)
        st.error(HISTORY_UNAVAILABLE)
        return
    except Exception:
        logger.exception("history unavailable")
        st.error(HISTORY_FAILED)
        return
    database_status().ready = True


def show_history() -> list[dict]:
    """Every figure is counted by the database (db.py), never by loading all the rows. Returns
    the models that answered (db.models_answering), which the versions table reuses."""
    models = db.models_answering()
    if not models:
        st.info(NO_HISTORY)
        return models
    chosen = choose_model(models)
    shown = [entry for entry in models if chosen is None or entry["model"] == chosen]
    answers = sum(entry["answers"] for entry in shown)
    correct = sum(entry["correct"] for entry in shown)
    answers_column, accuracy_column = st.columns(2, wrap=False)
    answers_column.metric("Answers stored", f"{answers:,}")
    accuracy_column.metric("Model accuracy", f"{correct / answers:.1%}")
    st.caption(f"The model was right on {correct:,} of {plural(answers, 'answer')}.")

    st.subheader("What you drew, what the model said", anchor=False)
    digits = db.digit_accuracy(chosen)
    matrix_column, digits_column = st.columns([3, 2], gap="medium")
    with matrix_column:
        st.altair_chart(confusion_chart(db.confusion_counts(chosen)), height=340, width="stretch")
    with digits_column:
        st.dataframe(
            digit_table(digits),
            hide_index=True,
            column_config={
                "accuracy": st.column_config.ProgressColumn(
                    format="%.1f%%", min_value=0, max_value=100, color="green"
                )
            },
        )
    st.markdown(confusions_text(db.most_confused(chosen), digits))

    st.subheader("Accuracy over time", anchor=False)
    show_accuracy_over_time(chosen)

    st.subheader("Newest answers", anchor=False)
    rows = db.recent_predictions(limit=HISTORY_LIMIT, model=chosen)
    if len(rows) < answers:
        st.caption(f"The newest {len(rows):,} of {answers:,}; the CSV holds them all.")
    st.dataframe(
        history_table(rows),
        hide_index=True,
        column_config={
            "time": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm:ss"),
            "confidence": st.column_config.NumberColumn(format="%.1f%%"),
        },
    )
    st.download_button(
        "Download all answers (CSV)" if chosen is None else "Download this model's answers (CSV)",
        data=partial(db.export_csv, chosen),  # run on the click, not on every page view
        file_name="predictions.csv",
        mime="text/csv",
        on_click="ignore",
        icon=":material/download:",
    )
    st.caption(DRAWINGS_EXPORT)
    return models


def show_versions(models: list[dict]) -> None:
    """The model versions that were live: when, their figures at promotion, and the answers
    they gave (*models*: db.models_answering's rows)."""
    rows = registry.store.history_rows(registry.store.history(models))
    if not rows:
        return
    st.subheader("Model versions", anchor=False)
    st.caption(
        "Each version that served this app, newest first: when it was live, how it compared"
        " when promoted (docs/promotion.md: the promotion rule), and how often its answers were"
        " right."
    )
    st.dataframe(
        pd.DataFrame(rows),
        hide_index=True,
        column_config={
            "accuracy of its answers": st.column_config.NumberColumn(format="%.1f%%"),
        },
    )


LEARNING_ATTEMPTS = 20  # the newest attempts of the feedback loop shown


def show_learning() -> None:
    """The feedback loop's newest attempts (learner.py): when, on how many answers, the verdict,
    and each one's comparison table."""
    attempts = db.learning_attempts(LEARNING_ATTEMPTS)
    if not attempts:
        return
    st.subheader("Learning from your answers", anchor=False)
    st.caption(
        "Each attempt of the learner, newest first: it trains a candidate on the answers and"
        " makes it live only if the promotion rule finds it better (docs/feedback-loop.md)."
    )
    st.dataframe(
        pd.DataFrame(
            {
                "started": row["started_at"],
                "finished": row["finished_at"],
                "answers": row["answers"],
                "new": row["new_answers"],
                "verdict": row["state"],
                "candidate": (row["candidate"] or "")[:12],
                "why": row["message"],
            }
            for row in attempts
        ),
        hide_index=True,
        column_config={
            "started": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm"),
            "finished": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm"),
        },
    )
    for row in attempts:
        if row["table"]:
            with st.expander(f"Attempt {row['id']} ({row['state']}): the comparison"):
                st.code(row["table"], language=None)


def show_shadow_pairs() -> None:
    """The live model against the shadow candidate on the same drawings (db.shadow_pairs), per
    pair that answered; nothing while no shadow has answered."""
    pairs = db.shadow_pairs()
    if not pairs:
        return
    st.subheader("Live against the shadow candidate", anchor=False)
    st.caption(
        "While a candidate runs in shadow (`python versions.py shadow`), every drawing is read by"
        " the live model, whose answer is shown, and by the candidate, whose answer is only"
        " stored: both judged by your answers on drawings neither trained on. Promotion counts"
        " them (docs/promotion.md)."
    )
    st.dataframe(shadow_table(pairs), hide_index=True)


def shadow_table(pairs: list[dict]) -> pd.DataFrame:
    """db.shadow_pairs' rows as History shows them: one row per (live, shadow) pair."""
    return pd.DataFrame(
        {
            "live model": [model_label(pair["model"]) for pair in pairs],
            "shadow candidate": [pair["shadow_model"] for pair in pairs],
            "drawings": [pair["answers"] for pair in pairs],
            "live right": [pair["live_right"] for pair in pairs],
            "candidate right": [pair["shadow_right"] for pair in pairs],
            "only the live model right": [pair["only_live"] for pair in pairs],
            "only the candidate right": [pair["only_shadow"] for pair in pairs],
        }
    )


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def model_label(name: str) -> str:
    return name or UNRECORDED_MODEL


def choose_model(models: list[dict]) -> str | None:
    """The model whose answers to show (None: all), chosen when more than one answered."""
    if len(models) == 1:
        st.caption(f"Every answer comes from the model {model_label(models[0]['model'])}.")
        return None
    by_name = {entry["model"]: entry for entry in models}

    def describe(name: str | None) -> str:
        if name is None:
            return "All models"
        entry = by_name[name]
        return (
            f"{model_label(name)}: {plural(entry['answers'], 'answer')}, "
            f"{entry['first_at']:%Y-%m-%d} to {entry['last_at']:%Y-%m-%d}"
        )

    return st.selectbox("Model", [None, *by_name], format_func=describe, key=MODEL_FILTER)


def confusion_chart(cells: list[dict]) -> alt.LayerChart:
    """Counts of (true label, predicted digit); only pairs that occurred are drawn, right
    answers in green, mistakes in red, each shade relative to its own kind."""
    frame = pd.DataFrame(cells, columns=["true_label", "predicted_digit", "answers"])
    digits = list(range(10))
    base = alt.Chart(frame).encode(
        x=alt.X(
            "predicted_digit:O",
            title="model said",
            scale=alt.Scale(domain=digits),
            axis=alt.Axis(orient="top", labelAngle=0),
        ),
        y=alt.Y("true_label:O", title="you drew", scale=alt.Scale(domain=digits)),
        tooltip=[
            alt.Tooltip("true_label:O", title="you drew"),
            alt.Tooltip("predicted_digit:O", title="model said"),
            alt.Tooltip("answers:Q", format=","),
        ],
    )

    def shaded(condition: str, colours: list[str]) -> alt.Chart:
        scale = alt.Scale(range=colours, zero=True)
        return (
            base.transform_filter(condition)
            .mark_rect()
            .encode(color=alt.Color("answers:Q", scale=scale, legend=None))
        )

    right = shaded("datum.true_label == datum.predicted_digit", ["#e5f5e0", "#41ab5d"])
    wrong = shaded("datum.true_label != datum.predicted_digit", ["#fee0d2", "#ef3b2c"])
    counts = base.mark_text(fontSize=11).encode(text=alt.Text("answers:Q", format=".3~s"))
    # A grey square behind the cells, so that pairs that never occurred read as empty.
    return (
        alt.layer(right, wrong, counts)
        .resolve_scale(color="independent")
        .configure_view(fill="#f4f4f6", stroke=None)
    )


def digit_table(rows: list[dict]) -> pd.DataFrame:
    """Per true label: answers, and the share the model read right (None without answers)."""
    by_digit = {row["true_label"]: row for row in rows}
    counts = [by_digit[d]["answers"] if d in by_digit else 0 for d in range(10)]
    right = [by_digit[d]["correct"] if d in by_digit else 0 for d in range(10)]
    return pd.DataFrame(
        {
            "digit": [str(digit) for digit in range(10)],
            "answers": counts,
            "accuracy": [100 * r / n if n else None for r, n in zip(right, counts, strict=True)],
        }
    )


def confusions_text(confused: list[dict], digits: list[dict]) -> str:
    if not confused:
        return "**Most often confused:** nothing yet, the model was right every time."
    drawn = {row["true_label"]: row["answers"] for row in digits}
    lines = ["**Most often confused:**"]
    for pair in confused:
        true_label, count = pair["true_label"], pair["answers"]
        times = "once" if count == 1 else f"{count:,} times"
        share = count / drawn[true_label]
        article = "an" if true_label == 8 else "a"
        lines.append(
            f"- {article} **{true_label}** read as **{pair['predicted_digit']}**: {times} "
            f"({share:.0%} of the {true_label}s)"
        )
    return "\n".join(lines)


def show_accuracy_over_time(model_filter: str | None) -> None:
    scale = st.radio(
        "Accuracy",
        [PER_ANSWERS, PER_DAY],
        horizontal=True,
        key=TIME_SCALE,
        label_visibility="collapsed",
    )
    per_day = scale == PER_DAY
    if per_day:
        points = db.accuracy_per_day(model_filter)
        x = alt.X("day:T", title="day (UTC)")
    else:
        points = db.accuracy_per_answers(model_filter, ANSWERS_PER_POINT)
        x = alt.X("last_answer:Q", title="answers")
    enough = (
        len({point["day"] for point in points}) > 1
        if per_day
        else points[-1]["last_answer"] > ANSWERS_PER_POINT
    )
    if not enough:
        wait = "answers on two days" if per_day else f"more than {ANSWERS_PER_POINT} answers"
        st.caption(f"The line appears with {wait}.")
        return
    frame = pd.DataFrame(points).drop(columns=["first_at", "last_at"], errors="ignore")
    frame["accuracy"] = frame["correct"] / frame["answers"]
    frame["model"] = frame["model"].map(model_label)
    if per_day:
        frame["day"] = pd.to_datetime(frame["day"])
    line = alt.Chart(frame).encode(
        x=x,
        y=alt.Y("accuracy:Q", axis=alt.Axis(format="%"), scale=alt.Scale(zero=False)),
        color=alt.Color(
            "model:N",
            legend=alt.Legend(orient="bottom", direction="vertical", title=None, labelLimit=0),
        ),
        tooltip=[
            alt.Tooltip("model:N"),
            alt.Tooltip("answers:Q", format=","),
            alt.Tooltip("accuracy:Q", format=".1%"),
        ],
    )
    chart = line.mark_line()
    if len(frame) <= MAX_DOTS:  # a dot per point, sized by its answers (a split group is small)
        size = alt.Size("answers:Q", scale=alt.Scale(range=[8, 50]), legend=None)
        chart += line.mark_circle().encode(size=size)
    st.altair_chart(chart, height=300, width="stretch")


def history_table(rows: list[dict]) -> pd.DataFrame:
    """Newest first, as the rows come; confidence in percent."""
    return pd.DataFrame(
        {
            "time": [row["created_at"] for row in rows],
            "predicted": [row["predicted_digit"] for row in rows],
            "true label": [row["true_label"] for row in rows],
            "confidence": [row["confidence"] * 100 for row in rows],
            "model": [model_label(row["model"] or "") for row in rows],
        }
    )


if __name__ == "__main__":  # run as a page by st.navigation (app.py)
    history_page()
