"""The documentation site builds with `mkdocs build --strict` (no broken link, no page left out of
the nav), and the README stays a front page: two commands first, under 200 lines."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_the_site_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=os.path.dirname(sys.executable))
    if mkdocs is None:
        pytest.fail("mkdocs is not installed: `make setup` installs the dev extras (mkdocs, mkdocs-material)")
    r = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "site" / "durability" / "index.html").exists()


def test_the_readme_opens_with_the_two_commands_and_stays_short():
    text = open(os.path.join(ROOT, "README.md")).read()
    lines = text.splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines: move detail into docs/"
    first_block = text.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block
