"""Atomic writes leave files with the mode the umask gives (group-readable reports)."""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from nucleiflow.pipeline.outputs.atomic import atomic_write, umask, write_json_atomic


@pytest.fixture(params=[0o022, 0o002, 0o077])
def with_umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_umask_is_read_without_changing_it(with_umask):
    assert umask() == with_umask
    assert umask() == with_umask


def test_json_reports_get_the_umask_mode(tmp_path, with_umask):
    path = write_json_atomic(tmp_path / "run.json", {"status": "done"})
    assert mode(path) == 0o666 & ~with_umask  # 0644 under 022: colleagues can read it


def test_a_temp_file_made_private_by_mkstemp_is_published_with_the_umask_mode(tmp_path, with_umask):
    final = tmp_path / "batch-1.json"
    with atomic_write(final) as tmp:
        fd, made = tempfile.mkstemp(dir=tmp_path)  # 0600 whatever the umask
        os.close(fd)
        os.replace(made, tmp)
        assert mode(tmp) == 0o600
    assert mode(final) == 0o666 & ~with_umask and final.is_file()

