#!/usr/bin/env bash
# Run the whole test suite from a fresh clone: installs the reference tools and the
# Python dependencies, then runs pytest on both cores.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-peers.sh
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]'
exec python3 -m pytest -n 2 -q "$@"
