"""Outputs are created with the process umask (tempfile's own files and directories are owner-only)."""

import os
import stat

import pyarrow as pa
import pytest

from cyclepref import store


@pytest.fixture(params=[0o022, 0o027])
def mask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_umask_is_read_without_changing_it(mask):
    assert store.umask() == mask
    assert store.umask() == mask


def test_atomic_files_and_directories_follow_the_umask(tmp_path, mask):
    table = store.write_table(pa.table({"x": [1, 2]}), tmp_path / "t" / "table.parquet")
    report = store.write_json({"a": 1}, tmp_path / "report.json")
    with store.atomic_dir(tmp_path / "model") as out:
        (out / "weights.bin").write_bytes(b"w")
    assert mode(table) == mode(report) == 0o666 & ~mask
    assert mode(tmp_path / "model") == 0o777 & ~mask
    assert mode(tmp_path / "model" / "weights.bin") == 0o666 & ~mask


def test_temporary_names_follow_the_umask(tmp_path, mask):
    assert mode(store.temp_file(tmp_path / "x")) == 0o666 & ~mask
    assert mode(store.temp_dir(tmp_path / "d")) == 0o777 & ~mask


def test_files_written_owner_only_by_a_library_get_the_umask_modes(tmp_path, mask):
    import torch
    from safetensors.torch import save_file

    with store.atomic_dir(tmp_path / "model") as out:
        save_file({"w": torch.zeros(2)}, str(out / "model.safetensors"))
        (out / "sub").mkdir(mode=0o700)
        (out / "sub" / "run.sh").write_text("#!/bin/sh\n")
        os.chmod(out / "sub" / "run.sh", 0o700)
        outside = tmp_path / "outside"
        outside.mkdir(mode=0o700)
        (out / "link").symlink_to(outside)
    assert mode(tmp_path / "model" / "model.safetensors") == 0o666 & ~mask
    assert mode(tmp_path / "model" / "sub") == 0o777 & ~mask
    assert mode(tmp_path / "model" / "sub" / "run.sh") == 0o777 & ~mask
    assert mode(tmp_path / "outside") == 0o700
