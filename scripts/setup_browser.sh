#!/usr/bin/env bash
# Idempotent: install Debian's chromium for the browser tests (tests/browser) only when it is missing.
# Playwright drives it through executable_path; Playwright's own browser download is not used.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
command -v chromium >/dev/null
