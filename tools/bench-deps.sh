#!/usr/bin/env bash
# Install the programs bench/compare.py drives (nginx, haproxy, iperf3, wrk, OpenSSH
# client and server) from Debian's packages. Idempotent: does nothing when all are there.
set -euo pipefail

have() {
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]
}

missing=()
have nginx || missing+=(nginx)
have haproxy || missing+=(haproxy)
have iperf3 || missing+=(iperf3)
have wrk || missing+=(wrk)
have ssh || missing+=(openssh-client)
have ssh-keygen || missing+=(openssh-client)
have sshd || missing+=(openssh-server)
if [ ${#missing[@]} -eq 0 ]; then
    echo "bench-deps: nginx, haproxy, iperf3, wrk and OpenSSH are installed"
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "bench-deps: run as root or install sudo to install: ${missing[*]}" >&2; exit 1; }
    SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive

# Packages like nginx and openssh-server start a system-wide service listening on every
# address when installed; the benchmark starts its own on 127.0.0.1, so forbid that
# (policy-rc.d exit 101 = "action not allowed"), unless a policy is already in place.
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
echo "bench-deps: installed ${packages[*]}"
