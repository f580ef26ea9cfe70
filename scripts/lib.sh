# Shell helpers shared by the setup scripts (sourced, not run).

# apt_ensure [--quiet-services] PACKAGE...: installs the packages that are not installed yet,
# without recommends. With --quiet-services, packages may not start their services during
# the install (a temporary policy-rc.d): the tests start their own instances on loopback.
apt_ensure() {
    local quiet=0
    if [ "${1:-}" = "--quiet-services" ]; then
        quiet=1
        shift
    fi
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ "${#missing[@]}" -gt 0 ] || return 0
    printf '\033[1m==> apt-get install %s\033[0m\n' "${missing[*]}" >&2
    local own_policy=0
    if [ "$quiet" -eq 1 ] && [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [ "$own_policy" -eq 1 ]; then
        rm -f /usr/sbin/policy-rc.d
    fi
}
