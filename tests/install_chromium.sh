#!/usr/bin/env bash
# Installs Debian's chromium for the browser test of the chat page (tests/serving/test_chat_page.py,
# specedge_jax/testing/browser.py). Idempotent: does nothing when /usr/bin/chromium is there.
#
# Debian's package, not `playwright install`: that downloads a browser build from outside the
# package registries, which this project's machines cannot reach. The playwright Python package
# drives this chromium through `executable_path`.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [[ -x "$CHROMIUM" ]]; then
  version="$("$CHROMIUM" --version 2>/dev/null || echo 'version unknown')"
  echo "install_chromium: $CHROMIUM is already installed ($version); nothing to do"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_chromium: $CHROMIUM is missing and there is no apt-get; install it by hand" >&2
  exit 1
fi

SUDO=()
if [[ "$(id -u)" != 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    echo "install_chromium: not root and no sudo; cannot run apt-get" >&2
    exit 1
  fi
fi

echo "install_chromium: $CHROMIUM is missing; running apt-get update"
"${SUDO[@]}" apt-get update -q
echo "install_chromium: running apt-get install -y --no-install-recommends chromium"
DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q --no-install-recommends chromium
echo "install_chromium: installed $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
