"""The retrain ingest into the pool (issue 12, defects 2 and 8; issue 21, point 2): nothing outside the watch
directory is read (a symlinked texts.jsonl included), a malformed texts file does not abort it, and the ingest is one
transaction: after a failure or a kill -9 at any step, the next run yields exactly one copy of every input and
removes the stale staging folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cyclepref import ingest
from cyclepref.ingest import BATCH_RECORD, ingest_inputs, pool_batches
from cyclepref.inputs import iter_pool

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def dirs(tmp_path):
    watch, pool = tmp_path / "watch", tmp_path / "data" / "pool"
    watch.mkdir()
    return watch, pool


def pool_rows(pool) -> list[dict]:
    return [json.loads(line) for b in pool_batches(pool) if (b / "texts.jsonl").exists()
            for line in (b / "texts.jsonl").read_text().splitlines()]


def pool_files(pool) -> list[str]:
    return sorted(p.relative_to(pool).as_posix() for b in pool_batches(pool) for p in b.rglob("*")
                  if p.is_file() and p.name not in ("texts.jsonl", BATCH_RECORD))


def quarantine_reasons(watch) -> list[str]:
    return [json.loads(line)["reason"] for q in (watch / ".ingested").glob("*/quarantine.jsonl")
            for line in q.read_text().splitlines()]


def drop(watch, names=("a.png", "sub/b.png")) -> None:
    for name in names:
        (watch / name).parent.mkdir(parents=True, exist_ok=True)
        (watch / name).write_bytes(f"png {name}".encode())
    rows = [{"file": n, "prompt": f"prompt of {n}"} for n in names] + [{"prompt": "text only"}]
    (watch / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_absolute_and_parent_paths_and_symlinks_do_not_escape_the_watch_directory(dirs, tmp_path):
    watch, pool = dirs
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"secret")
    (watch / "new.png").write_bytes(b"png")
    (watch / "link.png").symlink_to(secret)
    rows = [{"file": "new.png", "prompt": "new"}, {"file": str(secret), "prompt": "abs"},
            {"file": "../secret.png", "prompt": "up"}, {"file": "link.png", "prompt": "link"}]
    (watch / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ingest_inputs(watch, pool) == {"images": 1, "texts": 1, "quarantined": 4}
    [batch] = pool_batches(pool)
    assert pool_rows(pool) == [{"file": "new.png", "prompt": "new"}]
    assert pool_files(pool) == [f"{batch.name}/new.png"]
    reasons = quarantine_reasons(watch)
    assert len(reasons) == 4 and sum("path 'link.png' resolves outside" in r for r in reasons) == 2
    assert any("is absolute" in r for r in reasons) and any("climbs out" in r for r in reasons)
    assert secret.read_bytes() == b"secret"


def test_a_symlinked_texts_file_pointing_outside_is_quarantined_and_never_read(dirs, tmp_path):
    watch, pool = dirs
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text('{"prompt": "TOKEN-7f3a outside the watch folder"}\n')
    (watch / "texts.jsonl").symlink_to(outside)
    (watch / "a.png").write_bytes(b"png")
    assert ingest_inputs(watch, pool) == {"images": 1, "texts": 0, "quarantined": 1}
    assert not any("TOKEN-7f3a" in p.read_text(errors="replace") for p in pool.rglob("*") if p.is_file())
    assert outside.read_text() == '{"prompt": "TOKEN-7f3a outside the watch folder"}\n'
    [reason] = quarantine_reasons(watch)
    assert "resolves outside" in reason
    assert not os.path.lexists(watch / "texts.jsonl")


def test_a_file_name_that_is_not_utf8_is_quarantined_not_copied(dirs):
    watch, pool = dirs
    os.close(os.open(os.path.join(os.fsencode(watch), b"bad-\xff.png"), os.O_CREAT | os.O_WRONLY))
    (watch / "ok.png").write_bytes(b"png")
    assert ingest_inputs(watch, pool) == {"images": 1, "texts": 0, "quarantined": 1}
    assert [p.name for p in pool_batches(pool)[0].iterdir() if p.suffix == ".png"] == ["ok.png"]
    assert "not valid UTF-8" in quarantine_reasons(watch)[0]


def test_a_malformed_texts_file_is_ingested_once_with_the_bad_line_quarantined(dirs):
    watch, pool = dirs
    (watch / "a.png").write_bytes(b"png")
    (watch / "texts.jsonl").write_bytes(b'{"file": "a.png", "prompt": "a"}\n{broken\n\xff\xfe\n')
    assert ingest_inputs(watch, pool) == {"images": 1, "texts": 1, "quarantined": 2}
    assert ingest_inputs(watch, pool) == {"images": 0, "texts": 0, "quarantined": 0}
    assert len(pool_files(pool)) == 1 and len(pool_rows(pool)) == 1


def test_the_prepared_reader_sees_every_batch_with_its_texts(dirs):
    watch, pool = dirs
    drop(watch)
    ingest_inputs(watch, pool)
    drop(watch, ("c.png",))
    ingest_inputs(watch, pool)
    items = list(iter_pool(pool))
    assert sorted(i.prompt for i in items) == ["prompt of a.png", "prompt of c.png", "prompt of sub/b.png",
                                               "text only", "text only"]
    assert all(i.source.startswith("pool/") and i.problem is None for i in items)
    assert sorted(Path(i.image).read_bytes() for i in items if i.image) == [b"png a.png", b"png c.png",
                                                                            b"png sub/b.png"]


class Boom(RuntimeError):
    pass


def _fail_on(monkeypatch, owner, name: str, call: int) -> None:
    """Make owner.name raise Boom on its `call`-th call (counted from 1)."""
    real, seen = getattr(owner, name), {"n": 0}

    def failing(*args, **kwargs):
        seen["n"] += 1
        if seen["n"] == call:
            raise Boom(f"{name} call {call}")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


STEPS = {
    "journal written": (os, "replace", 1),
    "claim, after the first rename": (os, "rename", 2),
    "staging, second copy": (shutil, "copyfile", 2),
    "commit rename": (os, "replace", 2),
    "archive rename": (os, "replace", 3),
    "journal removal": (Path, "unlink", 1),
}


def _assert_exactly_once(watch, pool) -> None:
    assert pool_files(pool) == [f"{pool_batches(pool)[0].name}/{n}" for n in ("a.png", "sub/b.png")]
    assert sorted(r["prompt"] for r in pool_rows(pool)) == ["prompt of a.png", "prompt of sub/b.png", "text only"]
    assert sorted(p.name for p in watch.iterdir()) == [".ingested", ".ingesting"]
    assert list((watch / ".ingesting").iterdir()) == []
    assert [p.name for p in pool.parent.iterdir() if "staging" in p.name] == []
    [done] = (watch / ".ingested").iterdir()
    assert sorted(p.relative_to(done).as_posix() for p in done.rglob("*") if p.is_file()) == [
        "a.png", "sub/b.png", "texts.jsonl"]


@pytest.mark.parametrize("step", STEPS)
def test_a_failure_at_any_step_then_a_retry_yields_exactly_one_copy(dirs, monkeypatch, step):
    watch, pool = dirs
    drop(watch)
    with monkeypatch.context() as patch:
        _fail_on(patch, *STEPS[step])
        with pytest.raises(Boom):
            ingest_inputs(watch, pool)
    (watch / ".ingesting" / "19990101T000000Z.json.tmp").write_text("{")
    again = ingest_inputs(watch, pool)
    _assert_exactly_once(watch, pool)
    assert again == ({"images": 0, "texts": 0, "quarantined": 0} if step == "journal removal"
                     else {"images": 2, "texts": 3, "quarantined": 0})
    assert ingest_inputs(watch, pool) == {"images": 0, "texts": 0, "quarantined": 0}


KILLER = """
import os, shutil, sys
from pathlib import Path
from cyclepref.ingest import ingest_inputs
real, seen = shutil.copyfile, []
def copy_then_die(src, dst, **kw):
    seen.append(src)
    real(src, dst, **kw)
    if len(seen) == 2:
        os.kill(os.getpid(), 9)
shutil.copyfile = copy_then_die
ingest_inputs(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def test_kill_9_while_staging_leaves_a_stale_folder_that_the_next_run_removes(dirs):
    watch, pool = dirs
    drop(watch)
    res = subprocess.run([sys.executable, "-c", KILLER, str(watch), str(pool)], cwd=ROOT, capture_output=True)
    assert res.returncode == -9
    assert [p.name for p in pool.parent.iterdir() if "staging" in p.name] != []
    assert pool_batches(pool) == []
    assert ingest_inputs(watch, pool) == {"images": 2, "texts": 3, "quarantined": 0}
    _assert_exactly_once(watch, pool)


def test_new_arrivals_after_a_failed_run_make_a_second_batch_and_nothing_twice(dirs, monkeypatch):
    watch, pool = dirs
    drop(watch)
    with monkeypatch.context() as patch:
        _fail_on(patch, shutil, "copyfile", 1)
        with pytest.raises(Boom):
            ingest_inputs(watch, pool)
    drop(watch, ("late.png",))
    assert ingest_inputs(watch, pool) == {"images": 3, "texts": 5, "quarantined": 0}
    assert len(pool_batches(pool)) == 2
    assert sorted(Path(f).name for f in pool_files(pool)) == ["a.png", "b.png", "late.png"]
    assert ingest.remove_stale_staging(pool) == []
