"""The tables the feedback is stored in, in one place: their SQL (``create``), what the app's
role may do with them (``grant_app_role``), and the checks a row passes in Python before the
database is touched, the same as the tables' CHECKs (``check_digit``, ``check_confidence``,
``Drawing``). ``db.migrate`` (``python db.py migrate``) applies the first two as the owner.
"""

from __future__ import annotations

import math
import numbers
import struct
from dataclasses import dataclass

import psycopg
from psycopg import sql

# Limits of a stored drawing (see Drawing and docs/architecture.md, "The drawings"). A digit on the
# 280x280 canvas is 1-4 strokes of 20-150 points (one point per pointer event); a slow, shaky 0
# drawn for 5 s at 120 Hz, 600. These leave room for any honest drawing and bound a row to
# ~250 kB.
MAX_STROKES = 100  # strokes per drawing
MAX_STROKE_POINTS = 2_000  # points per stroke
MAX_POINTS = 10_000  # points per drawing, all strokes together
MIN_CANVAS_SIZE, MAX_CANVAS_SIZE = 28, 2_000  # side of the square canvas, px
IMAGE_BYTES = 28 * 28  # the model's input, uint8


def _none_in(column: str, path: str, vars: bool = False) -> str:
    """SQL: true when the strict jsonpath *path* finds nothing in *column*. Structural errors (a
    stroke that is not an array, ...) count as found: the CHECK fails instead of erroring out.
    With *vars*: the path may end in a filter comparing @ to $size (the canvas_size)."""
    if vars:
        path += " || @ < -$size || @ > 2 * $size)"
    variables = "jsonb_build_object('size', canvas_size)" if vars else "'{}'"
    return f"NOT coalesce(jsonb_path_exists({column}, 'strict {path}', {variables}, true), true)"


# Serialises schema creation between processes: concurrent CREATE TABLE IF NOT EXISTS can fail.
_SCHEMA_LOCK_KEY = 0x4D4E495354  # "MNIST"

_SCHEMA_SQL = (
    """
    CREATE TABLE IF NOT EXISTS predictions (
        id bigserial PRIMARY KEY,
        created_at timestamptz NOT NULL DEFAULT now(),
        predicted_digit smallint NOT NULL
            CONSTRAINT predictions_predicted_digit_check CHECK (predicted_digit BETWEEN 0 AND 9),
        true_label smallint NOT NULL
            CONSTRAINT predictions_true_label_check CHECK (true_label BETWEEN 0 AND 9),
        confidence real NOT NULL
            CONSTRAINT predictions_confidence_check CHECK (confidence >= 0 AND confidence <= 1),
        submission_id uuid UNIQUE,
        model text CONSTRAINT predictions_model_check CHECK (char_length(model) BETWEEN 1 AND 100)
    )
    """,
    # Tables created before submission_id existed.
    "ALTER TABLE predictions ADD COLUMN IF NOT EXISTS submission_id uuid UNIQUE",
    # Tables created before the model column existed: their rows keep a NULL model.
    "ALTER TABLE predictions ADD COLUMN IF NOT EXISTS model text"
    " CONSTRAINT predictions_model_check CHECK (char_length(model) BETWEEN 1 AND 100)",
    # The shadow model's answer to the same drawing (registry/live.py), never shown: its name
    # (as model names the live one's), digit and confidence, all three or none (no shadow ran;
    # answers stored before shadows existed). The same CHECKs as the live answer's.
    "ALTER TABLE predictions"
    " ADD COLUMN IF NOT EXISTS shadow_model text CONSTRAINT predictions_shadow_model_check"
    "  CHECK (char_length(shadow_model) BETWEEN 1 AND 100),"
    " ADD COLUMN IF NOT EXISTS shadow_digit smallint CONSTRAINT predictions_shadow_digit_check"
    "  CHECK (shadow_digit BETWEEN 0 AND 9),"
    " ADD COLUMN IF NOT EXISTS shadow_confidence real"
    "  CONSTRAINT predictions_shadow_confidence_check"
    "  CHECK (shadow_confidence >= 0 AND shadow_confidence <= 1)",
    # History's and promotion's shadow queries read these rows only (none without a shadow).
    "CREATE INDEX IF NOT EXISTS predictions_shadow_idx ON predictions (shadow_model, model)"
    " WHERE shadow_model IS NOT NULL",
    # ALTER TABLE has no ADD CONSTRAINT IF NOT EXISTS.
    """
    DO $$ BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'predictions_shadow_check'
                       AND conrelid = 'predictions'::regclass) THEN
            ALTER TABLE predictions ADD CONSTRAINT predictions_shadow_check CHECK (
                (shadow_model IS NULL) = (shadow_digit IS NULL)
                AND (shadow_digit IS NULL) = (shadow_confidence IS NULL));
        END IF;
    END $$
    """,
    "CREATE INDEX IF NOT EXISTS predictions_created_at_idx ON predictions (created_at DESC)",
    # Model versions (registry/store.py): every trained model's weights, by the SHA-256 of its file.
    """
    CREATE TABLE IF NOT EXISTS model_versions (
        sha256 text PRIMARY KEY
            CONSTRAINT model_versions_sha256_check CHECK (sha256 ~ '^[0-9a-f]{64}$'),
        created_at timestamptz NOT NULL DEFAULT now(),
        weights bytea NOT NULL,
        info jsonb NOT NULL DEFAULT '{}'
    )
    """,
    # Which version is live: the newest row (registry/store.py).
    """
    CREATE TABLE IF NOT EXISTS model_promotions (
        id bigserial PRIMARY KEY,
        sha256 text NOT NULL REFERENCES model_versions (sha256),
        promoted_at timestamptz NOT NULL DEFAULT now(),
        action text NOT NULL CONSTRAINT model_promotions_action_check
            CHECK (action IN ('initial', 'promote', 'rollback')),
        report jsonb NOT NULL DEFAULT '{}'
    )
    """,
    # Which version runs in shadow beside the live one: the newest row; a NULL sha256 turns
    # the shadow off (registry/store.py). A log like model_promotions: when each ran is kept.
    """
    CREATE TABLE IF NOT EXISTS model_shadow (
        id bigserial PRIMARY KEY,
        sha256 text REFERENCES model_versions (sha256),
        set_at timestamptz NOT NULL DEFAULT now()
    )
    """,
    # The drawing behind an answer (see Drawing), stored with it in one transaction. Answers
    # stored before this table existed, or with STORE_DRAWINGS off, have none. The CHECKs are
    # the last line of defence behind Drawing's own checks, for writers other than db.py.
    f"""
    CREATE TABLE IF NOT EXISTS drawings (
        prediction_id bigint PRIMARY KEY REFERENCES predictions (id) ON DELETE CASCADE,
        strokes jsonb NOT NULL CONSTRAINT drawings_strokes_check CHECK (
            coalesce(jsonb_path_query_first(strokes, 'strict $.size()', '{{}}', true)::int, 0)
                BETWEEN 1 AND {MAX_STROKES}
            AND {_none_in("strokes", '$[*] ? (@.type() != "array" || @.size() < 1)')}
            AND {_none_in("strokes", f"$[*] ? (@.size() > {MAX_STROKE_POINTS})")}
            AND jsonb_array_length(jsonb_path_query_array(strokes, 'strict $[*][*]', '{{}}', true))
                <= {MAX_POINTS}
        ),
        canvas_size smallint NOT NULL CONSTRAINT drawings_canvas_size_check
            CHECK (canvas_size BETWEEN {MIN_CANVAS_SIZE} AND {MAX_CANVAS_SIZE}),
        brush_width real NOT NULL CONSTRAINT drawings_brush_width_check
            CHECK (brush_width > 0 AND brush_width <= canvas_size / 2),
        image bytea NOT NULL CONSTRAINT drawings_image_check
            CHECK (octet_length(image) = {IMAGE_BYTES}),
        -- Every point [x, y], numbers within a canvas size of the canvas.
        CONSTRAINT drawings_points_check CHECK (
            {_none_in("strokes", '$[*][*] ? (@.type() != "array" || @.size() != 2)')}
            AND {_none_in("strokes", '$[*][*][*] ? (@.type() != "number"', vars=True)}
        )
    )
    """,
    # The feedback loop's attempts (learner.py): one row each, from its start, so that an
    # attempt killed half-way is seen (state 'running' with no learner holding the lock).
    """
    CREATE TABLE IF NOT EXISTS learning_attempts (
        id bigserial PRIMARY KEY,
        started_at timestamptz NOT NULL DEFAULT now(),
        finished_at timestamptz,
        state text NOT NULL DEFAULT 'running' CONSTRAINT learning_attempts_state_check
            CHECK (state IN ('running', 'promoted', 'refused', 'failed', 'interrupted')),
        answers integer NOT NULL CONSTRAINT learning_attempts_answers_check CHECK (answers >= 0),
        new_answers integer NOT NULL
            CONSTRAINT learning_attempts_new_answers_check CHECK (new_answers >= 0),
        through_id bigint NOT NULL,
        candidate text,
        report jsonb NOT NULL DEFAULT '{}',
        message text NOT NULL DEFAULT ''
    )
    """,
)


# --- the tables, and the app's role ---------------------------------------------------------


def create(conn: psycopg.Connection) -> None:
    """Create or upgrade the tables on *conn* (in its transaction): idempotent, and serialised
    between processes."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
    for statement in _SCHEMA_SQL:
        conn.execute(statement)


def grant_app_role(conn: psycopg.Connection, app_role: str, app_password: str | None) -> None:
    """Create *app_role* if missing, set its password if given, and grant it SELECT and INSERT
    on ``predictions``, INSERT on ``drawings``, SELECT on the model versions (which is live,
    which in shadow) and on the learning attempts, and nothing else (on *conn*, as the
    tables' owner; idempotent)."""
    role = sql.Identifier(app_role)
    if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (app_role,)).fetchone():
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(role))
    if app_password:
        # Utility statements take no parameters: quoted client-side.
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(role, sql.Literal(app_password)))
    database = sql.Identifier(conn.info.dbname)
    for grant in (
        "GRANT CONNECT ON DATABASE {database} TO {role}",
        # Only the owner creates tables (PostgreSQL 15+ does this by default).
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
        "GRANT USAGE ON SCHEMA public TO {role}",
        "GRANT SELECT, INSERT ON predictions TO {role}",
        "GRANT USAGE ON SEQUENCE predictions_id_seq TO {role}",
        # The live and shadow models' versions and weights (registry/live.py): read only.
        "GRANT SELECT ON model_versions, model_promotions, model_shadow TO {role}",
        # The feedback loop's attempts, for History: read only.
        "GRANT SELECT ON learning_attempts TO {role}",
        # Drawings: written with each answer, never read back by the app.
        "GRANT INSERT ON drawings TO {role}",
    ):
        conn.execute(sql.SQL(grant).format(database=database, role=role))


# --- rows: the tables' checks, in Python ----------------------------------------------------


def check_digit(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int from 0 to 9, got {value!r}")
    if not 0 <= value <= 9:
        raise ValueError(f"{name} must be from 0 to 9, got {value!r}")
    return int(value)


def check_confidence(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"confidence must be a number from 0 to 1, got {value!r}")
    result = float(value)
    if not (math.isfinite(result) and 0.0 <= result <= 1.0):
        raise ValueError(f"confidence must be from 0 to 1, got {value!r}")
    # The column is a 4-byte real: round here, or PostgreSQL rejects values below its range
    # (e.g. 1e-46) as an underflow instead of storing them as 0.
    return struct.unpack("f", struct.pack("f", result))[0]


MODEL_NAME_MAX = 100  # characters in predictions.model


class DrawingTooLarge(ValueError):
    """A drawing over the documented size limits (MAX_STROKES, MAX_STROKE_POINTS, MAX_POINTS)."""


@dataclass(frozen=True)
class Drawing:
    """The drawing behind one answer, as the ``drawings`` table keeps it.

    - *strokes*: one list of ``[x, y]`` points per stroke, in drawing order, in canvas pixels
      (origin top left, y down): the pointer positions the canvas sampled, through which it
      drew its curves (``drawings.from_canvas``, ``utils.draw_strokes``).
    - *canvas_size*: the side of the square canvas, px; *brush_width*: the stroke width, px.
    - *image*: the 28x28 image the model read, uint8 row-major (0 background, 255 ink).

    Checked when made: DrawingTooLarge over the size limits, ValueError for anything else
    invalid, before the database is touched.
    """

    strokes: list[list[list[float]]]
    canvas_size: int
    brush_width: float
    image: bytes

    def __post_init__(self) -> None:
        size = self.canvas_size
        if isinstance(size, bool) or not isinstance(size, numbers.Integral):
            raise ValueError(f"canvas_size must be an int, got {size!r}")
        if not MIN_CANVAS_SIZE <= size <= MAX_CANVAS_SIZE:
            raise ValueError(f"canvas_size must be {MIN_CANVAS_SIZE} to {MAX_CANVAS_SIZE} px")
        brush = self.brush_width
        if isinstance(brush, bool) or not isinstance(brush, numbers.Real):
            raise ValueError(f"brush_width must be a number, got {brush!r}")
        if not (math.isfinite(brush) and 0 < brush <= size / 2):
            raise ValueError(f"brush_width must be above 0 and at most {size / 2} px")
        if not isinstance(self.image, bytes) or len(self.image) != IMAGE_BYTES:
            raise ValueError(f"image must be {IMAGE_BYTES} bytes (28x28 uint8)")
        strokes = self.strokes
        if not isinstance(strokes, list) or not strokes:
            raise ValueError("strokes must be a non-empty list of strokes")
        # Sizes first: an oversized drawing is refused before its points are looked at.
        if len(strokes) > MAX_STROKES:
            raise DrawingTooLarge(f"{len(strokes)} strokes (at most {MAX_STROKES})")
        if not all(isinstance(stroke, list) and stroke for stroke in strokes):
            raise ValueError("each stroke must be a non-empty list of points")
        longest = max(len(stroke) for stroke in strokes)
        if longest > MAX_STROKE_POINTS:
            raise DrawingTooLarge(f"a stroke of {longest} points (at most {MAX_STROKE_POINTS})")
        total = sum(len(stroke) for stroke in strokes)
        if total > MAX_POINTS:
            raise DrawingTooLarge(f"{total} points (at most {MAX_POINTS})")
        low, high = -size, 2 * size
        for stroke in strokes:
            for point in stroke:
                if not (
                    isinstance(point, list)
                    and len(point) == 2
                    and all(
                        isinstance(v, numbers.Real)
                        and not isinstance(v, bool)
                        and low <= v <= high  # False for NaN
                        for v in point
                    )
                ):
                    raise ValueError(
                        f"each point must be [x, y], numbers from {low} to {high}: {point!r}"
                    )
