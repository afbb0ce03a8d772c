#!/usr/bin/env bash
# Install Debian's Chromium for the report's browser test (tests/test_report_browser.py) when
# no Chromium is on the machine and this user may install system packages (root, or sudo
# without a password). Never fails the caller: without a browser that one test skips and
# says why. Set QUANTLAB_CHROMIUM to use another Chromium/Chrome executable.
set -uo pipefail
if [ -n "${QUANTLAB_CHROMIUM:-}" ] || command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "browser: no apt-get on this machine; the browser test will skip (set QUANTLAB_CHROMIUM)" >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo="sudo -n"
  else
    echo "browser: not root; install Chromium with 'apt-get install chromium' for the browser test" >&2
    exit 0
  fi
fi
echo "browser: installing Debian's chromium (about a minute)" >&2
if ! { $sudo apt-get update -qq >/dev/null &&
       DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium fonts-dejavu-core >/dev/null; }; then
  echo "browser: 'apt-get install chromium' failed; the browser test will skip" >&2
fi
exit 0
