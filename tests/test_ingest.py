"""The retrain ingest (issue 12, defects 2 and 8): nothing outside the watch directory is read, a malformed texts
file does not abort it, and a failure leaves the inputs folder and the watch directory as they were."""

from __future__ import annotations

import json

import pytest

from flows.retrain import ingest_inputs


@pytest.fixture
def dirs(tmp_path):
    watch, inputs = tmp_path / "watch", tmp_path / "inputs"
    watch.mkdir()
    inputs.mkdir()
    (inputs / "texts.jsonl").write_text('{"file": "old.png", "prompt": "old"}')
    return watch, inputs


def texts_rows(inputs) -> list[dict]:
    return [json.loads(line) for line in (inputs / "texts.jsonl").read_text().splitlines()]


def copied(inputs) -> list[str]:
    return sorted(p.relative_to(inputs).as_posix() for p in (inputs / "incoming").rglob("*") if p.is_file())


def test_absolute_and_parent_paths_and_symlinks_do_not_escape_the_watch_directory(dirs, tmp_path):
    watch, inputs = dirs
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"secret")
    (watch / "new.png").write_bytes(b"png")
    (watch / "link.png").symlink_to(secret)
    rows = [{"file": "new.png", "prompt": "new"}, {"file": str(secret), "prompt": "abs"},
            {"file": "../secret.png", "prompt": "up"}, {"file": "link.png", "prompt": "link"}]
    (watch / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ingest_inputs(watch, inputs, "texts.jsonl") == {"images": 1, "texts": 1, "quarantined": 4}
    files = [r.get("file") for r in texts_rows(inputs)]
    assert files[0] == "old.png" and len(files) == 2 and files[1].endswith("/new.png")
    assert [f for f in copied(inputs) if f.endswith("link.png")] == []
    assert all(not (inputs / f).read_bytes() == b"secret" for f in copied(inputs))
    [done] = (watch / ".ingested").iterdir()
    reasons = [json.loads(line)["reason"] for line in (done / "quarantine.jsonl").read_text().splitlines()]
    assert len(reasons) == 4 and sum("path 'link.png' resolves outside" in r for r in reasons) == 2
    assert any("is absolute" in r for r in reasons) and any("climbs out" in r for r in reasons)


def test_a_malformed_texts_file_is_ingested_once_with_the_bad_line_quarantined(dirs):
    watch, inputs = dirs
    (watch / "a.png").write_bytes(b"png")
    (watch / "texts.jsonl").write_bytes(b'{"file": "a.png", "prompt": "a"}\n{broken\n\xff\xfe\n')
    assert ingest_inputs(watch, inputs, "texts.jsonl") == {"images": 1, "texts": 1, "quarantined": 2}
    assert ingest_inputs(watch, inputs, "texts.jsonl") == {"images": 0, "texts": 0, "quarantined": 0}
    assert len(copied(inputs)) == 1 and len(texts_rows(inputs)) == 2


def test_a_failed_ingest_changes_nothing_and_the_next_one_ingests_everything_once(dirs):
    watch, inputs = dirs
    (watch / "a.png").write_bytes(b"png")
    (watch / "texts.jsonl").write_text('{"file": "a.png", "prompt": "a"}\n')
    (inputs / "texts.jsonl").unlink()
    (inputs / "texts.jsonl").mkdir()
    with pytest.raises(IsADirectoryError):
        ingest_inputs(watch, inputs, "texts.jsonl")
    assert not (inputs / "incoming").exists()
    assert (watch / "a.png").exists() and (watch / "texts.jsonl").exists() and not (watch / ".ingested").exists()
    assert [p.name for p in inputs.parent.iterdir() if p.name.startswith(".inputs.ingest-")] == []
    (inputs / "texts.jsonl").rmdir()
    assert ingest_inputs(watch, inputs, "texts.jsonl") == {"images": 1, "texts": 1, "quarantined": 0}
    assert len(copied(inputs)) == 1 and texts_rows(inputs)[0]["file"] == copied(inputs)[0]
