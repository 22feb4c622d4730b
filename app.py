"""MNIST Digit Classifier: draw a digit, see what the model makes of it, confirm or correct it.

Run with ``streamlit run app.py``. Two pages, one file each (st.navigation): Draw (ui/draw.py, the
default) and History (ui/history.py). What they share is in ui/ (ui/__init__.py lists it).
"""

from __future__ import annotations

import logging

import streamlit as st

from ui.serving import database_status
from ui.session import CANVAS_GENERATION

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Phones (Streamlit stacks columns below 640 px): less room above the title, a smaller title,
# so that the canvas, the guess and the feedback row fit on one screen.
PHONE_CSS = """
<style>
@media (max-width: 640px) {
  [data-testid="stMainBlockContainer"] { padding-top: 3.25rem; padding-bottom: 3rem; }
  h1 { font-size: 1.75rem !important; padding: 0 !important; }
  .st-key-drawings_notice p { line-height: 1.25; }
}
</style>
"""


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    # pgserver (the embedded database) logs every command it runs at INFO.
    logging.getLogger("pgserver").setLevel(logging.WARNING)


def main() -> None:
    st.set_page_config(page_title="MNIST Digit Classifier", page_icon=":material/draw:")
    st.html(PHONE_CSS)
    configure_logging()
    st.session_state.setdefault(CANVAS_GENERATION, 0)
    database_status()  # initialise the database once per process
    pages = st.navigation(
        [
            st.Page(
                "ui/draw.py", title="Draw", icon=":material/draw:", url_path="draw", default=True
            ),
            st.Page(
                "ui/history.py", title="History", icon=":material/history:", url_path="history"
            ),
        ]
    )
    pages.run()


if __name__ == "__main__":
    main()
