"""The bad-input corpus of issue 12 through prepare_inputs and through the retrain ingest: every raw item is kept
(with its note) or quarantined (with its reason) as its case says, counts add up, nothing outside is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures.bad_inputs import OUTSIDE, Case, write_corpus, write_special_entries

from cyclepref import inputs as inp
from cyclepref import store
from cyclepref.config import PrepareInputs, load_params
from cyclepref.tables import PATHS
from flows.retrain import ingest_inputs
from tasks import prepare_inputs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, list[Case]]:
    folder = tmp_path / "data" / "corpus"
    return folder, write_corpus(folder)


def run_prepare(root: Path, path: str) -> tuple[dict, dict[str, tuple[str, str]]]:
    """The stage's summary and {source: (outcome, note or reason)} of every raw item."""
    params = load_params(ROOT / "params.yaml")
    cfg = PrepareInputs(source="folder", path=path, texts_file="texts.jsonl", pool="data/pool")
    summary = prepare_inputs.run(params.model_copy(update={"prepare_inputs": cfg}), root)
    kept = store.read_table(root / PATHS["inputs"], inp.INPUTS_SCHEMA).to_pylist()
    quarantined = store.read_table(root / PATHS["quarantine"], inp.QUARANTINE_SCHEMA).to_pylist()
    outcomes = {r["source"]: ("kept", r["note"] or "") for r in kept}
    outcomes |= {q["source"]: ("quarantined", q["reason"]) for q in quarantined}
    assert len(outcomes) == len(kept) + len(quarantined), "one outcome per source"
    return summary, outcomes


def assert_outcome(case: Case, outcomes: dict, source: str, reason: str) -> None:
    assert source in outcomes, f"{case.kind}: {source} neither kept nor quarantined"
    outcome, text = outcomes[source]
    assert outcome == case.outcome and reason in text, f"{case.kind}: {outcome} ({text})"


def never_read_outside(root: Path, corpus_dir: Path) -> None:
    secret = inp.png_bytes(inp.normalise_image(inp.decode_image((corpus_dir.parent / OUTSIDE).read_bytes())))
    images = store.read_table(root / PATHS["inputs"], inp.INPUTS_SCHEMA).column("image").to_pylist()
    assert secret not in images


def test_corpus_has_at_least_twenty_kinds(corpus):
    _, cases = corpus
    assert len({c.kind for c in cases}) == len(cases) >= 20


def test_corpus_through_prepare_inputs(corpus, tmp_path):
    folder, cases = corpus
    summary, outcomes = run_prepare(tmp_path, "data/corpus")
    assert summary["inputs"] + summary["quarantined"] == len(outcomes) == len(cases)
    for case in cases:
        assert_outcome(case, outcomes, case.source, case.reason)
    never_read_outside(tmp_path, folder)


def test_entries_named_like_images_that_are_no_files_are_quarantined(corpus, tmp_path):
    folder, cases = corpus
    special = write_special_entries(folder)
    summary, outcomes = run_prepare(tmp_path, "data/corpus")
    assert summary["inputs"] + summary["quarantined"] == len(outcomes) == len(cases) + len(special)
    for case in special:
        assert_outcome(case, outcomes, case.source, case.reason)


def test_preflight_flags_every_entry_dvc_cannot_hash_in_the_corpus(corpus, tmp_path):
    from cyclepref.preflight import scan

    folder, _ = corpus
    write_special_entries(folder)
    found = scan(tmp_path, "data/corpus")
    flagged = {line.split(": ", 1)[0]: line for line in found}
    expected = {"caf\\xe9.png": "not valid UTF-8", "loop.png": "symbolic link loop", "broken.png": "dangling",
                "fifo.png": "a FIFO", "sock.png": "a socket"}
    if (folder / "device.png").exists():
        expected["device.png"] = "a character device"
    assert set(flagged) == {f"data/corpus/{name}" for name in expected}, found
    for name, what in expected.items():
        assert what in flagged[f"data/corpus/{name}"] and "; fix: " in flagged[f"data/corpus/{name}"]


def test_corpus_through_the_retrain_ingest_then_prepare_inputs(corpus, tmp_path):
    folder, cases = corpus
    pool = tmp_path / "data" / "pool"
    (tmp_path / "data" / "inputs").mkdir(parents=True)
    (tmp_path / "data" / "inputs" / "texts.jsonl").write_text("")
    counts = ingest_inputs(folder, pool)
    at_ingest = [c for c in cases if c.ingest]
    passed = [c for c in cases if not c.ingest]
    assert counts["quarantined"] == len(at_ingest)
    assert counts["texts"] == sum(c.row is not None for c in passed)
    [done] = (folder / ".ingested").iterdir()
    log = {q["source"]: q["reason"] for q in map(json.loads, (done / "quarantine.jsonl").read_text().splitlines())}
    for case in at_ingest:
        assert case.ingest in log[case.source], f"{case.kind}: {log.get(case.source)}"
    assert not any(p.is_file() and p.name != "quarantine.jsonl" for p in folder.rglob("*") if ".ingested" not in
                   p.relative_to(folder).parts), "originals moved to .ingested"

    summary, outcomes = run_prepare(tmp_path, "data/inputs")
    assert summary["inputs"] + summary["quarantined"] == len(outcomes) == len(passed)
    [stamp] = pool.iterdir()
    line = 0
    for case in passed:
        line += case.row is not None
        where = f"pool/{stamp.name}"
        source = f"{where}/texts.jsonl:{line}" if case.source.startswith("texts.jsonl:") else f"{where}/{case.source}"
        assert_outcome(case, outcomes, source, case.after_ingest or case.reason)
    never_read_outside(tmp_path, folder)
    assert ingest_inputs(folder, pool) == {"images": 0, "texts": 0, "quarantined": 0}
