"""The code passes the linter configured in pyproject.toml ([tool.ruff]): `ruff check` on the
project root finds nothing. ruff comes with the `test` extras, so a missing install fails here."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_ruff_check_passes():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)],
                          cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
