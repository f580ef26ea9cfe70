#!/usr/bin/env bash
# Installs apisix-agent as a systemd service, idempotently:
#   target/release/apisix-agent      -> /usr/local/bin/apisix-agent        (always replaced)
#   config.example.yaml              -> /etc/apisix-agent/config.yaml      (only if absent)
#   deploy/systemd/apisix-agent.service -> /etc/systemd/system/apisix-agent.service
# then, when systemd is the running init (/run/systemd/system exists), daemon-reload and
# `enable --now` (a restart if it was already running, to pick up the new binary);
# otherwise it prints the commands to run on a systemd host.
#
#   sudo deploy/systemd/install.sh
#
# Environment: BIN=path of the binary (default target/release/apisix-agent, build it first
# with `cargo build --release`); DESTDIR=staging root (files only, no systemctl).
set -euo pipefail

die() { printf 'install: %s\n' "$*" >&2; exit 1; }
log() { printf '==> %s\n' "$*" >&2; }

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
BIN="${BIN:-$root/target/release/apisix-agent}"
DESTDIR="${DESTDIR:-}"
unit_src="$here/apisix-agent.service"
config_src="$root/config.example.yaml"

[ -n "$DESTDIR" ] || [ "$(id -u)" -eq 0 ] || die "must run as root (or set DESTDIR to stage the files)"
[ -x "$BIN" ] || die "$BIN not found: build it first with 'cargo build --release' (or set BIN=)"
[ -f "$unit_src" ] || die "$unit_src missing"

bindir="$DESTDIR/usr/local/bin"
confdir="$DESTDIR/etc/apisix-agent"
unitdir="$DESTDIR/etc/systemd/system"

# Check the configuration the service will use with the binary about to be installed,
# before anything is replaced.
if [ -e "$confdir/config.yaml" ]; then cfg="$confdir/config.yaml"; else cfg="$config_src"; fi
[ -f "$cfg" ] || die "$config_src missing and $confdir/config.yaml absent"
log "checking $cfg"
"$BIN" check-config "$cfg" >/dev/null || die "$cfg is invalid (see above); nothing installed"

log "binary  -> $bindir/apisix-agent"
install -d -m 0755 "$bindir"
# Copy then rename, so a running agent keeps its (old) executable and never sees a partial one.
install -m 0755 "$BIN" "$bindir/.apisix-agent.new"
mv -f "$bindir/.apisix-agent.new" "$bindir/apisix-agent"

install -d -m 0755 "$confdir"
# The configuration holds the basic auth users' bcrypt hashes: readable by root only (the
# agent runs as root), also when it already existed. (A staging run as a normal user keeps
# its own ownership: it cannot give files away.)
if [ "$(id -u)" -eq 0 ]; then owner=(-o root -g root); else owner=(); fi
if [ -e "$confdir/config.yaml" ]; then
    log "config  -> $confdir/config.yaml exists, kept (made 0640 root:root)"
    [ "$(id -u)" -ne 0 ] || chown root:root "$confdir/config.yaml"
    chmod 0640 "$confdir/config.yaml"
elif [ -f "$config_src" ]; then
    log "config  -> $confdir/config.yaml (from config.example.yaml, 0640 root:root)"
    install -m 0640 "${owner[@]}" "$config_src" "$confdir/config.yaml"
else
    die "$config_src missing and $confdir/config.yaml absent"
fi

log "unit    -> $unitdir/apisix-agent.service"
install -d -m 0755 "$unitdir"
install -m 0644 "$unit_src" "$unitdir/apisix-agent.service"

if [ -n "$DESTDIR" ]; then
    log "DESTDIR set: files staged under $DESTDIR, systemd not touched"
    exit 0
fi

if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    was_active=0
    systemctl is-active --quiet apisix-agent.service && was_active=1
    log "systemctl daemon-reload"
    systemctl daemon-reload
    log "systemctl enable --now apisix-agent.service"
    systemctl enable --now apisix-agent.service
    if [ "$was_active" -eq 1 ]; then
        log "systemctl restart apisix-agent.service (new binary/unit)"
        systemctl restart apisix-agent.service
    fi
    sleep 1
    systemctl --no-pager --lines=5 status apisix-agent.service || true
    systemctl is-active --quiet apisix-agent.service \
        || die "apisix-agent.service is not active: journalctl -u apisix-agent.service"
    log "metrics: curl -s http://127.0.0.1:9464/metrics (listen address: $confdir/config.yaml)"
else
    cat >&2 <<EOF
==> systemd is not the running init (PID 1 is '$(ps -o comm= -p 1 2>/dev/null || echo '?')'):
    the files are installed, the service was not started. On a systemd host run:
        systemctl daemon-reload
        systemctl enable --now apisix-agent.service
        systemctl status apisix-agent.service; journalctl -u apisix-agent.service -f
    Without systemd, run it in the foreground (as root):
        /usr/local/bin/apisix-agent run --config /etc/apisix-agent/config.yaml
EOF
fi
