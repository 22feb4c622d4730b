"""The model registry: which model the app serves, and why.

- store.py: every trained model as a version in PostgreSQL, the live one, rollback and export,
  what the History page shows.
- promotion.py: the rule a candidate must pass to become live, and ``promote()``.
- live.py: the live model in an app process, following the registry.

Its command line is versions.py (list, rollback, export).
"""
