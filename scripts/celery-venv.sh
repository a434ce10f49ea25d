#!/usr/bin/env bash
# Makes (once) the virtualenv the Celery example and its test use, and prints its
# path: ${CELERY_VENV:-$HOME/.cache/epu/celery-venv}, with Celery 5 in it.
# Bounded: pip gets 10 minutes. Exit 0 with the path on stdout, else 1 saying why.
set -euo pipefail
venv="${CELERY_VENV:-$HOME/.cache/epu/celery-venv}"
log() { printf '== celery-venv: %s\n' "$*" >&2; }
if [ -x "$venv/bin/celery" ] && "$venv/bin/python" -c 'import celery, kombu' 2>/dev/null; then
  printf '%s\n' "$venv"
  exit 0
fi
log "installing celery into $venv"
mkdir -p "$(dirname "$venv")"
if ! python3 -m venv "$venv" 2>/dev/null; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo_=""; [ "$(id -u)" -ne 0 ] && sudo_=sudo
    $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  fi
  python3 -m venv "$venv" || { log "cannot create a virtualenv at $venv (python3 -m venv)"; exit 1; }
fi
if ! timeout 600 "$venv/bin/pip" install -q 'celery>=5.3,<6'; then
  log "pip could not install celery into $venv within 10 minutes"
  exit 1
fi
"$venv/bin/python" -c 'import celery; print(celery.__version__)' >&2
printf '%s\n' "$venv"
