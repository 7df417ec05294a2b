#!/usr/bin/env bash
# Installs the Debian packages whose real texts the offline task sequences are built from (README, "Task
# sequences"): WordNet, GCIDE, the King James Bible and the Jargon File. Does nothing when they are present.
# Needs apt-get and root (or sudo). Used by the README's test command and by .ci/run.
set -euo pipefail
PACKAGES="wordnet-base dict-gcide bible-kjv jargon-text"
missing=""
for p in $PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
[ -z "$missing" ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_texts: no apt-get here; install the Debian packages$missing (or their files) yourself" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
