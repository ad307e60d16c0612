#!/usr/bin/env bash
# The real peers only the test suite needs, from Debian's packages: a DNS server and
# client (UDP apps), an HTTP CONNECT proxy, a load balancer in front of several relay
# nodes, PostgreSQL (the tests start a throwaway server, tests/postgres.py) and Chromium
# for the admin center's browser tests. The tests start each one themselves, so no
# system service is left enabled: tinyproxy comes as its executable-only package, and
# the units that haproxy's and PostgreSQL's packages enable are disabled again.
set -euo pipefail
need=()
command -v dnsmasq >/dev/null || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
command -v dig >/dev/null || need+=(bind9-dnsutils)
command -v tinyproxy >/dev/null || [ -x /usr/bin/tinyproxy ] || need+=(tinyproxy-bin)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v initdb >/dev/null || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
command -v chromium >/dev/null || [ -x /usr/bin/chromium ] || need+=(chromium)
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
echo "installing the test peers ${need[*]} with apt-get"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
# Only where systemd runs (not in a container): leave none of the peers' units enabled or running.
if [ -d /run/systemd/system ]; then
    for unit in haproxy postgresql tinyproxy; do
        if systemctl is-enabled --quiet "$unit" 2>/dev/null; then
            echo "disabling the system unit $unit (the tests start their own)"
            $sudo systemctl disable --now --quiet "$unit"
        fi
    done
fi
