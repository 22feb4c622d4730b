#!/usr/bin/env bash
# Restore a backup made by deploy/backup-db.sh (or any plain SQL dump, gzipped or not) into the
# `db` compose service. Tables in the dump are dropped and recreated; stop the app meanwhile:
#
#   docker compose stop app
#   deploy/restore-db.sh backups/mnist-20250101T031700Z.sql.gz
#   docker compose start app
set -euo pipefail

if [ "$#" -ne 1 ] || [ ! -f "$1" ]; then
    echo "Usage: deploy/restore-db.sh BACKUP.sql[.gz]" >&2
    exit 2
fi
backup="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"

case "$backup" in
    *.gz) reader=(gzip -dc -- "$backup") ;;
    *) reader=(cat -- "$backup") ;;
esac

# One transaction: a failing statement rolls everything back instead of leaving half a restore.
# shellcheck disable=SC2016
"${reader[@]}" | docker compose exec -T db sh -c \
    'psql --quiet --single-transaction -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB"'
echo "Restored $backup"
