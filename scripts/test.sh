#!/usr/bin/env bash
# Sets up everything the tests need on a fresh Debian machine, then runs them.
# Usage: bash scripts/test.sh [pytest args]     (STRESS=1 also runs the long stress tests)
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian tools the end-to-end tests drive (real SMTP client, real DNS server,
# and a real headless browser for Mail Control: tests/web/test_browser.py).
need=()
command -v swaks >/dev/null || need+=(swaks)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
command -v haproxy >/dev/null || need+=(haproxy)
command -v opendkim >/dev/null || [ -x /usr/sbin/opendkim ] || need+=(opendkim opendkim-tools)
[ -x /usr/sbin/opendkim-genkey ] || need+=(opendkim-tools)  # inbound A-R test: its keys (tests/e2e/test_authres_e2e.py)
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
# Dovecot for the mailbox tests (tests/e2e/test_dovecot_e2e.py); its own service stays stopped.
for p in dovecot-imapd dovecot-pop3d dovecot-lmtpd dovecot-sieve; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
# postgrey, the greylister of the bulk-delivery tests (tests/e2e/bulk_peers.py runs private
# instances on loopback); its system service stays stopped and disabled.
command -v postgrey >/dev/null || need+=(postgrey)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
    # Installing Dovecot starts the system service; the tests run private instances only.
    if [[ " ${need[*]} " == *" dovecot-"* ]]; then service dovecot stop >/dev/null 2>&1 || true; fi
    # Installing opendkim starts its system service; tests and bench/relay.py run private instances only.
    if [[ " ${need[*]} " == *" opendkim "* ]]; then
      service opendkim stop >/dev/null 2>&1 || true
      update-rc.d opendkim disable >/dev/null 2>&1 || true
      systemctl disable opendkim >/dev/null 2>&1 || true
    fi
    if [[ " ${need[*]} " == *" postgrey "* ]]; then
      service postgrey stop >/dev/null 2>&1 || true
      update-rc.d postgrey disable >/dev/null 2>&1 || true
      systemctl disable postgrey >/dev/null 2>&1 || true
    fi
  else
    echo "missing Debian packages: ${need[*]} (run as root or install them)" >&2
  fi
fi

# The project and its test extra, editable in compat mode so that twistd
# finds twisted/plugins/epost_plugin.py through sys.path.
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]' --config-settings editable_mode=compat

exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
