#!/usr/bin/env bash
# Back up the app's PostgreSQL database (the `db` compose service) to a gzipped SQL file.
#
#   deploy/backup-db.sh                 # -> backups/mnist-YYYYmmddTHHMMSSZ.sql.gz
#   deploy/backup-db.sh /srv/backups    # another directory
#   KEEP=30 deploy/backup-db.sh         # keep the 30 newest backups (default 14; 0 = keep all)
#
# Cron (daily at 03:17):  17 3 * * * cd /path/to/repo && deploy/backup-db.sh >>backups/cron.log 2>&1
# Restore with deploy/restore-db.sh FILE. The dump uses --clean --if-exists, so restoring it
# replaces the tables it contains. Copy backups off the server too (scp, object storage).
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"

OUT_DIR="${1:-backups}"
KEEP="${KEEP:-14}"
case "$KEEP" in
    '' | *[!0-9]*)
        echo "KEEP must be a number, got '$KEEP'" >&2
        exit 2
        ;;
    *) ;;
esac

mkdir -p "$OUT_DIR"
umask 077
file="$OUT_DIR/mnist-$(date -u +%Y%m%dT%H%M%SZ).sql.gz"
partial="$file.partial"
trap 'rm -f "$partial"' EXIT

# $POSTGRES_USER and $POSTGRES_DB are expanded inside the db container, from its environment.
# shellcheck disable=SC2016
docker compose exec -T db sh -c 'pg_dump --clean --if-exists --no-owner -U "$POSTGRES_USER" -d "$POSTGRES_DB"' |
    gzip >"$partial"
mv "$partial" "$file"
echo "Backup written: $file ($(wc -c <"$file") bytes)"

if [ "$KEEP" -gt 0 ]; then
    # Names sort by time; the glob expands in sorted order.
    backups=("$OUT_DIR"/mnist-*.sql.gz)
    excess=$((${#backups[@]} - KEEP))
    if [ "$excess" -gt 0 ]; then
        for old in "${backups[@]:0:excess}"; do
            rm -f -- "$old"
            echo "Removed old backup: $old"
        done
    fi
fi
