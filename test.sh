#!/usr/bin/env bash
# Run the whole test suite: lint (ruff), types (mypy), then pytest. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh test
echo "== ruff" && .venv/bin/ruff check .
echo "== mypy" && .venv/bin/mypy
echo "== pytest"
# Two workers: CI has two cores; every test uses its own root and free ports.
exec .venv/bin/pytest -q -n 2 -p no:cacheprovider "$@"
