"""The TypeScript logic of the Mesh sidebar, through its Jest suite (``jlpm test``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LABEXTENSION = Path(__file__).resolve().parents[1] / "labextension"


def jlpm() -> list[str]:
    exe = shutil.which(
        "jlpm", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    )
    if exe is None:
        pytest.fail("jlpm not found: install jupyterlab in this environment")
    return [exe]


@pytest.mark.slow
def test_typescript_unit_tests_pass():
    if not (LABEXTENSION / "node_modules" / ".bin" / "jest").exists():
        install = subprocess.run(
            [*jlpm(), "install", "--immutable"],
            cwd=LABEXTENSION,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    result = subprocess.run(
        [*jlpm(), "test", "--ci"],
        cwd=LABEXTENSION,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "failed" not in output.split("Tests:")[-1].split("\n")[0], output[-2000:]
