#!/usr/bin/env bash
# Update a running deployment to the newest commit of its branch, on the server, in the checkout:
#
#   deploy/update.sh
#
# git pull (fast-forward only), docker compose build, docker compose up -d --wait (recreates only
# what changed; the database volume is kept), then shows each service's state and the app's
# health. Stops at the first step that fails: the running containers stay as they were when the
# pull or the build fails. The Deploy workflow (.github/workflows/deploy.yml) runs this script
# over SSH. Uses the compose files of COMPOSE_FILE (e.g. in .env) like any compose command.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"

step() { printf '==> %s\n' "$*"; }

step "git pull ($(git rev-parse --short HEAD))"
git pull --ff-only
step "now at $(git log -1 --format='%h %s')"

step "docker compose build"
docker compose build

step "docker compose up -d --wait"
docker compose up -d --wait --wait-timeout "${WAIT_TIMEOUT:-300}"

step "health"
docker compose ps
# From inside the app container (python: the image always has it), so it works whatever port,
# if any, the app is published on.
docker compose exec -T app python -c "import urllib.request as u; print('app health:', \
u.urlopen('http://localhost:8501/_stcore/health', timeout=10).read().decode())"
