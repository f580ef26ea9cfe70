#!/usr/bin/env bash
# Makes a Docker daemon available for the container tests, idempotently:
#  - installs Debian's docker.io and debootstrap with apt if missing (service start-up during
#    the install is suppressed with a temporary policy-rc.d);
#  - if nothing answers on /var/run/docker.sock, starts our own daemon directly (no systemd
#    needed) with networking locked down: `dockerd --bridge=none --iptables=false
#    --ip-forward=false`, so containers can only use `--network host` or `--network none`;
#  - waits up to 60 s for `docker info`; removes a docker0 bridge if a packaged daemon made one.
# Log: /var/log/apisix-profiler-dockerd.log.
set -euo pipefail

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'docker-up: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
export DEBIAN_FRONTEND=noninteractive

SOCK=/var/run/docker.sock
LOG=/var/log/apisix-profiler-dockerd.log
PIDFILE=/var/run/apisix-profiler-dockerd.pid
DOCKERD_ARGS=(--bridge=none --iptables=false --ip-forward=false --host "unix://$SOCK" --pidfile "$PIDFILE")
WAIT_SECS="${DOCKER_UP_TIMEOUT:-60}"

# --- packages ------------------------------------------------------------------------------
# The package may not start its own daemon (it would use the default docker0 bridge).
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"
apt_ensure --quiet-services docker.io debootstrap
command -v dockerd >/dev/null || die "dockerd not found after installing docker.io"
command -v docker >/dev/null || die "docker CLI not found"

# Stop a daemon started by the package's service manager (systemd or sysv), if any: it would
# run with the default bridge network. Ours is recognisable by its pidfile.
ours_running() {
    [ -s "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null \
        && tr '\0' ' ' <"/proc/$(cat "$PIDFILE")/cmdline" | grep -q -- '--bridge=none'
}
if ! ours_running; then
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        for u in docker.service docker.socket; do
            if systemctl is-active --quiet "$u" 2>/dev/null; then
                log "stopping packaged $u"
                systemctl stop "$u" || true
            fi
        done
    elif [ -x /etc/init.d/docker ] && /etc/init.d/docker status >/dev/null 2>&1; then
        log "stopping packaged docker (init.d)"
        /etc/init.d/docker stop || true
    fi
fi

# --- daemon ----------------------------------------------------------------------------------
if docker -H "unix://$SOCK" info >/dev/null 2>&1; then
    if ours_running; then
        log "dockerd already running (pid $(cat "$PIDFILE"), --bridge=none)"
    else
        # A foreign daemon answers: accept it only if it has no bridge network.
        pid="$(pgrep -xo dockerd || true)"
        if [ -n "$pid" ] && ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- '--bridge=none'; then
            die "a dockerd (pid $pid) without --bridge=none answers on $SOCK; stop it and rerun"
        fi
        log "dockerd already answering on $SOCK"
    fi
else
    if pid="$(pgrep -xo dockerd)"; then
        die "dockerd (pid $pid) is running but $SOCK does not answer; see $LOG"
    fi
    rm -f "$SOCK" "$PIDFILE"
    log "starting dockerd ${DOCKERD_ARGS[*]} (log: $LOG)"
    mkdir -p "$(dirname "$LOG")"
    printf '\n--- %s docker-up.sh starting dockerd\n' "$(date -Is)" >>"$LOG"
    setsid nohup dockerd "${DOCKERD_ARGS[@]}" >>"$LOG" 2>&1 </dev/null &
    started=$!
    deadline=$((SECONDS + WAIT_SECS))
    until docker -H "unix://$SOCK" info >/dev/null 2>&1; do
        if ! kill -0 "$started" 2>/dev/null; then
            tail -n 20 "$LOG" >&2
            die "dockerd exited during start-up; see $LOG"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 20 "$LOG" >&2
            die "docker info did not answer within ${WAIT_SECS}s; dockerd pid $started still running, see $LOG"
        fi
        sleep 1
    done
    log "dockerd up (pid $started)"
fi

# --- no bridge -------------------------------------------------------------------------------
if ip link show docker0 >/dev/null 2>&1; then
    log "deleting docker0 bridge"
    ip link delete docker0 || die "could not delete docker0"
fi
if docker network ls --format '{{.Driver}}' | grep -qx bridge; then
    die "the running daemon has a bridge network; it must run with --bridge=none"
fi
docker version --format 'docker client {{.Client.Version}}, server {{.Server.Version}}' >&2
