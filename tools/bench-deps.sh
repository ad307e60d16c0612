#!/usr/bin/env bash
# Install the programs bench/compare.py drives (nginx, haproxy, iperf3, wrk, OpenSSH
# client and server, v2ray, stunnel) from Debian's packages, and matplotlib (its --plot)
# into the repository's .venv when there is one. Idempotent: does nothing when all are there.
set -euo pipefail
cd "$(dirname "$0")/.."

have() {
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]
}

# matplotlib draws `compare.py --plot`; the same requirement as pyproject.toml's `bench` extra.
MATPLOTLIB='matplotlib>=3.6'
if [ -x .venv/bin/python ] && ! .venv/bin/python -c 'import matplotlib' 2>/dev/null; then
    # Optional (only --plot needs it): a failed install is said, not fatal.
    if .venv/bin/python -m pip install -q "$MATPLOTLIB"; then
        echo "bench-deps: installed $MATPLOTLIB into .venv"
    else
        echo "bench-deps: could not install $MATPLOTLIB into .venv; compare.py --plot needs it" >&2
    fi
fi

missing=()
have nginx || missing+=(nginx)
have haproxy || missing+=(haproxy)
have iperf3 || missing+=(iperf3)
have wrk || missing+=(wrk)
have ssh || missing+=(openssh-client)
have ssh-keygen || missing+=(openssh-client)
have sshd || missing+=(openssh-server)
have v2ray || missing+=(v2ray)
have stunnel4 || have stunnel || missing+=(stunnel4)
if [ ${#missing[@]} -eq 0 ]; then
    echo "bench-deps: nginx, haproxy, iperf3, wrk, OpenSSH, v2ray and stunnel are installed"
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "bench-deps: run as root or install sudo to install: ${missing[*]}" >&2; exit 1; }
    SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive

# Packages like nginx, openssh-server and v2ray start a system-wide service when installed;
# the benchmark starts its own on 127.0.0.1, so forbid that (policy-rc.d exit 101 =
# "action not allowed"), unless a policy is already in place.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    "${SUDO[@]}" sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
    trap '"${SUDO[@]}" rm -f '"$policy" EXIT
fi

"${SUDO[@]}" apt-get update -q
packages=()
for p in "${missing[@]}"; do
    if [ "$p" = nginx ]; then
        # nginx-light is the small build; later Debian releases dropped it, then plain nginx.
        if apt-cache show nginx-light >/dev/null 2>&1; then p=nginx-light; fi
    fi
    packages+=("$p")
done
# Duplicates (openssh-client twice) are harmless to apt-get.
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${packages[@]}"

# policy-rc.d keeps a service from starting, not from being enabled for the next boot:
# v2ray's package enables v2ray.service (and its SysV script), stunnel4's stunnel.target.
# Leave no benchmark peer's system service enabled or running: `systemctl disable` also
# works without a running systemd (it edits the links, SysV ones included); --now stops
# the unit where systemd runs.
if command -v systemctl >/dev/null 2>&1; then
    now=()
    [ -d /run/systemd/system ] && now=(--now)
    for unit in v2ray.service stunnel.target; do
        if [ -e "/lib/systemd/system/$unit" ] || [ -e "/usr/lib/systemd/system/$unit" ]; then
            "${SUDO[@]}" systemctl disable "${now[@]}" "$unit"
        fi
    done
fi
echo "bench-deps: installed ${packages[*]}"
