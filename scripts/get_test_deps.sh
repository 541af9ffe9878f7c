#!/usr/bin/env bash
# Installs Debian's chromium and chromium-driver for the browser test of report.html, where apt
# is available. Idempotent; without apt (or root) the browser test is skipped with its reason.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "note: apt-get not available; the headless-browser test of report.html will be skipped"
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
    echo "note: not root; install chromium and chromium-driver to run the browser test of report.html"
    exit 0
  fi
fi
echo "installing chromium and chromium-driver (Debian) for the report browser test"
$sudo apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
  || { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; } \
  || echo "note: could not install chromium; the browser test of report.html will be skipped"
exit 0
