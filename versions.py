"""Model versions, promotion and rollback: which model the app serves, and why.

The model registry's command line. The registry is the package registry/: the versions and the
live one in PostgreSQL (store.py), the promotion rule (promotion.py, run by ``train.py
--promote``), the live model each app process serves (live.py).

    python versions.py list                  # every version: when it was live, its figures
    python versions.py rollback 3f2a9c       # make an earlier version live again (hash prefix)
    python versions.py export model.pth      # the live model's weights, to a file
    python versions.py shadow 7b1e04         # run a candidate in shadow beside the live model
    python versions.py shadow off            # and stop
    python versions.py promote 7b1e04        # judge a version again now (its shadow answers
                                             # among the evidence); live only by the rule
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import db
import model as model_lib
from registry.store import (
    VersionError,
    connect,
    export,
    figures_text,
    live_sha,
    rollback,
    set_shadow,
    shadow_sha,
    versions_table,
)

log = logging.getLogger("versions")

EXIT_BAD_INPUT = 2  # versions.py: unknown or ambiguous version, unreadable file


def _print_list(rows: list[dict[str, Any]], live: str | None, shadow: str | None) -> None:
    for row in rows:
        info = row["info"] or {}
        marker = "*" if row["sha256"] == live else "s" if row["sha256"] == shadow else " "
        print(f"{marker} {row['sha256'][:12]}  created {row['created_at']:%Y-%m-%d %H:%M:%S %Z}")
        sources = "+".join(info.get("sources") or []) or "unknown data"
        print(f"    {sources}: {figures_text(info)}")
        if row["sha256"] == shadow:
            print("    in shadow now: reads every drawing beside the live model, never shown")
        for period in row["live"]:
            until = f"{period['until']:%Y-%m-%d %H:%M:%S}" if period["until"] else "now"
            print(f"    live ({period['action']}) {period['since']:%Y-%m-%d %H:%M:%S} to {until}")
        if not row["live"]:
            print("    never live")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every version, the live one marked *, the shadow s")
    back = commands.add_parser("rollback", help="make an earlier version live again")
    back.add_argument("version", help="the start of its hash (see list)")
    back.add_argument(
        "--out", type=Path, default=model_lib.DEFAULT_MODEL_PATH, help="also write it here"
    )
    out = commands.add_parser("export", help="write the live model's weights to a file")
    out.add_argument("path", type=Path)
    shadow = commands.add_parser(
        "shadow", help="run a version in shadow: every drawing read by it too, never shown"
    )
    shadow.add_argument("version", help="the start of its hash (see list), or off")
    judged = commands.add_parser(
        "promote",
        help="judge a version against the live one now, by the promotion rule, with the evidence"
        " there is now (its answers in shadow among it): live only if better",
    )
    judged.add_argument("version", help="the start of its hash (see list)")
    judged.add_argument(
        "--out", type=Path, default=model_lib.DEFAULT_MODEL_PATH, help="also write it here"
    )
    judged.add_argument("--report", type=Path, help="the verdict and comparison, as JSON")
    args = parser.parse_args(argv)
    if args.command == "promote":
        return judge(args.version, args.out, args.report)
    try:
        if args.command == "list":
            with connect(None) as conn:
                rows, live, shadow = versions_table(conn), live_sha(conn), shadow_sha(conn)
            if not rows:
                print("no versions yet: the app serves models/model.pth")
            _print_list(rows, live, shadow)
        elif args.command == "rollback":
            sha = rollback(args.version, out=args.out)
            print(f"{sha[:12]} is live; its weights are in {args.out}")
        elif args.command == "shadow":
            off = args.version.strip().lower() == "off"
            sha = set_shadow(None if off else args.version)
            print("no shadow" if sha is None else f"{sha[:12]} is in shadow beside the live model")
        else:
            sha = export(args.path)
            print(f"wrote the live model {sha[:12]} to {args.path}")
    except (VersionError, model_lib.ModelLoadError, OSError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    except db.DatabaseUnavailable as exc:
        log.error("%s", exc)
        return 1
    return 0


def judge(prefix: str, out: Path, report: Path | None) -> int:
    """`python versions.py promote PREFIX`: training.promote.judge, with MNIST and the pen
    digits where training finds them (MNIST_DIR, PENDIGITS_DIR); its exit code (0 promoted,
    promotion.EXIT_REFUSED refused)."""
    import tempfile

    from mnist import DatasetError
    from training import promote as training_promote
    from training.config import TrainConfig

    with tempfile.TemporaryDirectory(prefix="judge-") as work:
        config = TrainConfig(out=out, checkpoint_dir=Path(work), promote=True, report=report)
        try:
            return training_promote.judge(config, prefix)
        except (VersionError, model_lib.ModelLoadError, OSError, DatasetError) as exc:
            log.error("%s", exc)
            return EXIT_BAD_INPUT
        except db.DatabaseUnavailable as exc:
            log.error("%s", exc)
            return 1


if __name__ == "__main__":
    sys.exit(main())
