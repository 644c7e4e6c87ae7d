#!/usr/bin/env bash
# Run spoolq's main job: the daemon with its web UI on http://127.0.0.1:3333, on the
# filesystem store at the default root (or $SPOOLQ_ROOT). Extra arguments go to `spoolq serve`.
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh run
exec .venv/bin/spoolq serve "$@"
