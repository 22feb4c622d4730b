"""The app's pages and what they share. app.py runs the pages (st.navigation), which import the
rest; the modules below them (db, model, registry, ...) never import ui.

- draw.py: the Draw page (the default): canvas, guess, feedback row.
- history.py: the History page: what the stored answers say about the model.
- session.py: one session on the Draw page: session_state keys, the drawing's analysis, an answer
  from a click to a stored row.
- analysis.py: what the app makes of one drawing (the prediction, the image the model saw).
- serving.py: shared by every session, once per process: the model, the database.
"""
