#!/usr/bin/env bash
# Deploy or update the MNIST Digit Classifier as a Docker Swarm stack (deploy/stack.yml).
#
#   deploy/stack-deploy.sh            # stack "mnist": services mnist_app, mnist_db, mnist_proxy
#   deploy/stack-deploy.sh STACK      # another stack name
#   APP_REPLICAS=4 deploy/stack-deploy.sh   # scale (also from .env)
#
# Run it on a swarm manager, in the checkout, with .env as for docker compose (.env.example) plus
# optional APP_REPLICAS (default 2) and HTTP_PORT (Caddy's published port, default 80). Variables
# already set in the environment win over .env. The image APP_IMAGE must exist: on one machine,
# `docker compose build app`; on several, push it to a registry (deploy/README.md).
#
# Steps: (1) the secrets STACK_postgres_password and STACK_app_db_password from .env, if missing
# (Docker secrets never change: see deploy/README.md to rotate a password); (2) the label
# mnist.db=true on this node if no node has it (the database runs there, with its volume);
# (3) on the first deploy, the stack without app replicas (the database and its network);
# (4) the schema migration once, as a one-shot swarm job with the new image (`python db.py
# migrate`, which also refuses replicas whose connection pools exceed max_connections);
# (5) `docker stack deploy`, which rolls the app replicas over one at a time (start-first) and
# waits until every service has converged.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"

STACK="${1:-mnist}"
TIMEOUT_S="${TIMEOUT_S:-300}"

log() { printf '==> %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() {
    printf 'ERROR: %s\n' "$*" >&2
    exit 1
}

case "$STACK" in
    [a-z0-9]*) ;;
    *) die "stack name '$STACK': start with a lower-case letter or digit" ;;
esac
case "$STACK" in
    *[!a-z0-9_-]*) die "stack name '$STACK': use only a-z, 0-9, - and _" ;;
    *) ;;
esac

# .env, as docker compose reads it: KEY=VALUE lines (quotes around VALUE dropped, nothing
# expanded), a later line wins over an earlier one; the environment wins over the file.
if [ -f .env ]; then
    preset=" "
    while read -r key; do
        [ -z "${!key+set}" ] || preset="$preset$key "
    done < <(sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/\1/p' .env)
    while IFS= read -r line || [ -n "$line" ]; do
        key="${line%%=*}"
        case "$line" in [A-Za-z_]*=*) ;; *) continue ;; esac
        case "$key" in *[!A-Za-z0-9_]*) continue ;; *) ;; esac
        case "$preset" in *" $key "*) continue ;; *) ;; esac
        value="${line#*=}"
        case "$value" in \"*\" | \'*\') value="${value:1:${#value}-2}" ;; *) ;; esac
        export "$key=$value"
    done <.env
fi

[ -n "${POSTGRES_PASSWORD:-}" ] || die "POSTGRES_PASSWORD is not set: put it in .env (see .env.example)"
[ -n "${APP_DB_PASSWORD:-}" ] || die "APP_DB_PASSWORD is not set: put it in .env (see .env.example)"
export STACK
export APP_IMAGE="${APP_IMAGE:-mnist-classifier:latest}"
export APP_REPLICAS="${APP_REPLICAS:-2}"
export HTTP_PORT="${HTTP_PORT:-80}"
case "$APP_REPLICAS" in '' | *[!0-9]* | 0) die "APP_REPLICAS must be a positive number, got '$APP_REPLICAS'" ;; *) ;; esac

state=$(docker info --format '{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}}')
[ "$state" = "active true" ] ||
    die "this node is not a swarm manager ($state): docker swarm init, or run this on a manager"
docker image inspect "$APP_IMAGE" >/dev/null 2>&1 ||
    warn "no image $APP_IMAGE on this node: every node must pull it from its registry"

# 1. Secrets, from .env. Their label holds a digest, to notice a password changed in .env.
ensure_secret() { # NAME VALUE
    local digest current
    digest=$(printf '%s' "$2" | sha256sum | cut -c1-64)
    if current=$(docker secret inspect --format '{{index .Spec.Labels "mnist.sha256"}}' "$1" 2>/dev/null); then
        [ "$current" = "$digest" ] ||
            warn "secret $1 differs from .env and keeps its old value (deploy/README.md: rotating a password)"
    else
        printf '%s' "$2" | docker secret create --label "mnist.sha256=$digest" "$1" - >/dev/null
        log "created secret $1"
    fi
}
ensure_secret "${STACK}_postgres_password" "$POSTGRES_PASSWORD"
ensure_secret "${STACK}_app_db_password" "$APP_DB_PASSWORD"

# 2. The database's node.
labelled=""
for node in $(docker node ls --quiet); do
    if [ "$(docker node inspect --format '{{index .Spec.Labels "mnist.db"}}' "$node")" = true ]; then
        labelled="$node"
    fi
done
if [ -z "$labelled" ]; then
    docker node update --label-add mnist.db=true "$(docker info --format '{{.Swarm.NodeID}}')" >/dev/null
    log "labelled this node mnist.db=true: the database and its volume live here"
fi

CADDYFILE_VERSION=$(sha256sum deploy/stack.Caddyfile | cut -c1-12)
export CADDYFILE_VERSION

deploy() { # extra environment for the stack file, e.g. APP_REPLICAS=0
    env "$@" docker stack deploy --detach=false --quiet --prune --with-registry-auth --compose-file deploy/stack.yml "$STACK"
}

# 3. First deploy: the database and the networks before any app replica.
if ! docker service inspect "${STACK}_db" >/dev/null 2>&1; then
    log "first deploy of stack $STACK: the database first"
    deploy APP_REPLICAS=0 LEARNER_REPLICAS=0 >/dev/null
fi

# 4. The migration: once, with the new image, before any replica runs it.
job="${STACK}_migrate"
docker service rm "$job" >/dev/null 2>&1 || true # left by an interrupted run
log "migrating the schema (job $job, image $APP_IMAGE)"
docker service create --quiet --detach --name "$job" --mode replicated-job \
    --label "com.docker.stack.namespace=$STACK" \
    --network "${STACK}_backend" \
    --secret "source=${STACK}_postgres_password,target=postgres_password,uid=1000,gid=1000,mode=0400" \
    --secret "source=${STACK}_app_db_password,target=app_db_password,uid=1000,gid=1000,mode=0400" \
    --env POSTGRES_HOST=db --env POSTGRES_PORT=5432 \
    --env "POSTGRES_USER=${POSTGRES_USER:-postgres}" --env "POSTGRES_DB=${POSTGRES_DB:-postgres}" \
    --env POSTGRES_PASSWORD_FILE=/run/secrets/postgres_password \
    --env APP_DB_PASSWORD_FILE=/run/secrets/app_db_password \
    --env "APP_REPLICAS=$APP_REPLICAS" \
    --restart-condition on-failure --restart-delay 3s --restart-max-attempts 20 \
    --no-healthcheck "$APP_IMAGE" python db.py migrate >/dev/null
# Tries again (the database may still be starting) until it completes or fails 20 times.
deadline=$((SECONDS + TIMEOUT_S))
while :; do
    states=$(docker service ps --format '{{.CurrentState}}' "$job")
    if grep -q '^Complete' <<<"$states"; then
        break
    fi
    failed=$(grep -c '^Failed\|^Rejected' <<<"$states" || true)
    if [ "$failed" -gt 20 ] || [ "$SECONDS" -gt "$deadline" ]; then
        docker service logs --raw "$job" 2>&1 | tail -n 20 >&2
        docker service rm "$job" >/dev/null
        die "the migration did not complete (its log above): nothing deployed"
    fi
    sleep 1
done
docker service logs --raw "$job" 2>&1 | grep -v '^WARNING' | tail -n 3 || true
docker service rm "$job" >/dev/null

# 5. The stack itself.
log "deploying stack $STACK: $APP_REPLICAS app replicas of $APP_IMAGE, Caddy on port $HTTP_PORT, ${LEARNER_REPLICAS:-1} learner"
deploy
docker stack services "$STACK"
log "done: http://$(hostname -I 2>/dev/null | cut -d' ' -f1 || echo SERVER):$HTTP_PORT"
