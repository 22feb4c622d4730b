#!/usr/bin/env bash
# Server-side setup of the MNIST Digit Classifier on a fresh Ubuntu/Debian VM (DigitalOcean,
# Hetzner, ...). Idempotent: run it again after every `git pull` to rebuild and restart.
#
#   sudo deploy/setup-server.sh            # app on http://PUBLIC_IP:8501
#   sudo deploy/setup-server.sh --https    # behind Caddy on https://$DOMAIN (DOMAIN in .env)
#   DRY_RUN=1 deploy/setup-server.sh       # print the system commands instead of running them
#
# Steps: install Docker Engine + Compose plugin if missing (Docker's apt repository);
# create .env from .env.example with generated POSTGRES_PASSWORD and APP_DB_PASSWORD where it has
# none (an existing password is never changed); make ./models and ./data writable by the containers' UID 1000;
# allow SSH and the app port (or 80/443 with --https) in ufw and enable it;
# `docker compose up -d --build --wait`.
#
# DRY_RUN=1 (or --dry-run) prints every command that needs root or the network, prefixed with
# "+ ", and runs none of them; it still creates .env and the data/models directories, which are
# plain files inside this checkout.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: deploy/setup-server.sh [--https] [--no-start] [--dry-run]

  --https      serve through Caddy with HTTPS (docker-compose.https.yml); needs DOMAIN in .env
  --no-start   prepare everything but do not run `docker compose up`
  --dry-run    print system commands instead of running them (same as DRY_RUN=1)

Environment: DRY_RUN=1, SSH_PORT (default 22) for the ufw rule.
EOF
}

DRY_RUN="${DRY_RUN:-0}"
HTTPS=0
START=1
while [ "$#" -gt 0 ]; do
    case "$1" in
        --https) HTTPS=1 ;;
        --no-start) START=0 ;;
        --dry-run) DRY_RUN=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "unknown option: $1" >&2
            usage >&2
            exit 2
            ;;
    esac
    shift
done

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"

SSH_PORT="${SSH_PORT:-22}"
MIN_COMPOSE_VERSION="2.24.0" # long env_file syntax (required: false) and !reset

log() { printf '==> %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() {
    printf 'ERROR: %s\n' "$*" >&2
    exit 1
}

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi

# Run a command as root; with DRY_RUN=1 only print it.
as_root() {
    if [ "$DRY_RUN" = 1 ]; then
        printf '+'
        printf ' %q' "${SUDO[@]}" "$@"
        printf '\n'
    else
        "${SUDO[@]}" "$@"
    fi
}

# Write stdin to a root-owned file; with DRY_RUN=1 only print what would be written.
write_root_file() {
    local path="$1" content
    content="$(cat)"
    if [ "$DRY_RUN" = 1 ]; then
        printf '+ write %s:\n%s\n' "$path" "$content"
    else
        printf '%s\n' "$content" | "${SUDO[@]}" tee "$path" >/dev/null
    fi
}

# version_ge A B: true when version A >= version B (dotted numbers).
version_ge() {
    [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" = "$2" ]
}

# Value of KEY in .env (last assignment wins, surrounding quotes removed); empty if unset.
env_get() {
    local value
    value="$(sed -n "s/^[[:space:]]*$1[[:space:]]*=//p" .env | tail -n 1)"
    value="${value%\"}"
    value="${value#\"}"
    value="${value%\'}"
    value="${value#\'}"
    printf '%s' "$value"
}

# Set KEY=VALUE in .env: replace the first assignment of KEY, or append one.
env_set() {
    local tmp
    tmp="$(mktemp .env.XXXXXX)"
    awk -v key="$1" -v value="$2" '
        !done && $0 ~ "^[[:space:]]*" key "[[:space:]]*=" { print key "=" value; done = 1; next }
        { print }
        END { if (!done) print key "=" value }
    ' .env >"$tmp"
    chmod 600 "$tmp"
    mv "$tmp" .env
}

# 64 hex characters = 256 random bits; only [0-9a-f], so safe in URLs and shell.
generate_password() {
    od -vAn -N32 -tx1 /dev/urandom | tr -d ' \n'
}

compose_ok() {
    local version
    command -v docker >/dev/null 2>&1 || return 1
    version="$(docker compose version --short 2>/dev/null)" || return 1
    version_ge "${version#v}" "$MIN_COMPOSE_VERSION"
}

install_docker() {
    if compose_ok; then
        log "Docker and Compose >= $MIN_COMPOSE_VERSION already installed"
        return
    fi
    local os_id="" codename="" arch
    if [ -r /etc/os-release ]; then
        # shellcheck disable=SC1091
        os_id="$(. /etc/os-release && printf '%s' "${ID:-}")"
        # shellcheck disable=SC1091
        codename="$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")"
    fi
    case "$os_id" in
        ubuntu | debian) ;;
        *) die "automatic Docker install supports Ubuntu and Debian only (found '${os_id:-unknown}'): install Docker Engine and the Compose plugin, then run this again" ;;
    esac
    arch="$(dpkg --print-architecture 2>/dev/null || echo amd64)"
    log "Installing Docker Engine and the Compose plugin from Docker's apt repository"
    as_root apt-get update
    as_root apt-get install -y ca-certificates curl
    as_root install -m 0755 -d /etc/apt/keyrings
    as_root curl -fsSL "https://download.docker.com/linux/$os_id/gpg" -o /etc/apt/keyrings/docker.asc
    as_root chmod a+r /etc/apt/keyrings/docker.asc
    write_root_file /etc/apt/sources.list.d/docker.list <<EOF
deb [arch=$arch signed-by=/etc/apt/keyrings/docker.asc] https://download.docker.com/linux/$os_id $codename stable
EOF
    as_root apt-get update
    as_root apt-get install -y docker-ce docker-ce-cli containerd.io docker-buildx-plugin docker-compose-plugin
    as_root systemctl enable --now docker
    if [ "$DRY_RUN" != 1 ] && ! compose_ok; then
        die "docker compose >= $MIN_COMPOSE_VERSION is still not available"
    fi
}

ensure_env_file() {
    local name
    if [ ! -f .env ]; then
        [ -f .env.example ] || die ".env.example not found in $REPO_DIR"
        (umask 077 && cp .env.example .env)
        log "Created .env from .env.example"
    fi
    # The database owner's password, and the app role's (mnist_app: it may only read and insert
    # predictions). A password already set is never changed: PostgreSQL keeps the first one.
    for name in POSTGRES_PASSWORD APP_DB_PASSWORD; do
        if [ -z "$(env_get "$name")" ]; then
            env_set "$name" "$(generate_password)"
            log "Generated $name in .env"
        else
            log ".env already sets $name: left unchanged"
        fi
    done
    chmod 600 .env
    # Run through sudo: hand .env to the calling user, so `docker compose` works without sudo too.
    if [ "$(id -u)" -eq 0 ] && [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
        chown "$SUDO_USER": .env
    fi
}

prepare_dirs() {
    local uid gid
    uid="$(env_get TRAIN_UID)"
    gid="$(env_get TRAIN_GID)"
    mkdir -p data models/checkpoints
    # The containers run as UID 1000 (the image's "app" user): training writes here.
    as_root chown -R "${uid:-1000}:${gid:-1000}" data models
}

configure_firewall() {
    local app_port app_bind
    app_port="$(env_get APP_PORT)"
    app_port="${app_port:-8501}"
    app_bind="$(env_get APP_BIND)"
    app_bind="${app_bind:-0.0.0.0}"
    if [ "$DRY_RUN" != 1 ] && ! command -v ufw >/dev/null 2>&1; then
        warn "ufw is not installed: allow only SSH ($SSH_PORT) and the app's ports in your provider's firewall"
        return
    fi
    # SSH first, so that enabling the firewall never locks us out. Rules are idempotent.
    as_root ufw allow "$SSH_PORT/tcp"
    if [ "$HTTPS" = 1 ]; then
        as_root ufw allow 80/tcp
        as_root ufw allow 443/tcp
        as_root ufw allow 443/udp
    elif [ "$app_bind" != "127.0.0.1" ]; then
        as_root ufw allow "$app_port/tcp"
    fi
    as_root ufw --force enable
    # Note: ports published by Docker bypass ufw (Docker writes its own iptables rules), which
    # is why docker-compose.yml publishes nothing for the database.
}

start_stack() {
    local files=(-f docker-compose.yml)
    if [ "$HTTPS" = 1 ]; then
        files+=(-f docker-compose.https.yml)
    fi
    if [ "$START" != 1 ]; then
        log "Not starting (--no-start). Start with: docker compose ${files[*]} up -d --build --wait"
        return
    fi
    log "Building and starting the stack"
    as_root docker compose "${files[@]}" up -d --build --wait
}

main() {
    if [ "$DRY_RUN" = 1 ]; then
        log "DRY RUN: system commands are printed, not run"
    fi
    install_docker
    ensure_env_file
    if [ "$HTTPS" = 1 ] && [ -z "$(env_get DOMAIN)" ]; then
        die "--https needs DOMAIN=your.domain in .env (its DNS A record pointing at this server)"
    fi
    prepare_dirs
    configure_firewall
    start_stack

    local ip port
    ip="$(hostname -I 2>/dev/null | awk '{print $1}')" || true
    port="$(env_get APP_PORT)"
    if [ "$HTTPS" = 1 ]; then
        log "Done. Open https://$(env_get DOMAIN)/"
    else
        log "Done. Open http://${ip:-PUBLIC_IP}:${port:-8501}/"
    fi
    log "Logs: docker compose logs -f app    Train: docker compose --profile train up -d train"
}

main
