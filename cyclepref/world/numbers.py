"""The README's sandbox numbers, generated from reports/sandbox.json.

README.md holds them between BEGIN and END; `cyclepref report` rewrites that block (`sync`) and
tests/test_readme_numbers.py fails when it differs from what reports/sandbox.json gives. Keys are read by name and a
row whose keys are absent is left out. To add rows, write `rows(report) -> list[(question, i2t cell, t2i cell)]`
and append it to ROWS.
"""

from __future__ import annotations

from collections.abc import Callable

from cyclepref.world import verdicts

BEGIN = "<!-- sandbox-numbers: generated from reports/sandbox.json by `cyclepref report`; do not edit -->"
END = "<!-- /sandbox-numbers -->"
TASKS = ("i2t", "t2i")
Row = tuple[str, str, str]


def _share(e: dict | None, key: str = "value") -> str:
    if not isinstance(e, dict) or not isinstance(e.get(key), int | float):
        return ""
    return f"{100 * e[key]:.1f}% [{100 * e['ci95_low']:.1f}, {100 * e['ci95_high']:.1f}]"


def _signed(value, low, high) -> str:
    if not all(isinstance(v, int | float) for v in (value, low, high)):
        return ""
    return f"{value:+.3f} [{low:+.3f}, {high:+.3f}]"


def agreement(report: dict) -> list[Row]:
    agree = report.get("agreement", {})
    cells = []
    for t in TASKS:
        overall = (agree.get(t) or {}).get("overall")
        cells.append(f"{_share(overall)} of {overall['n']} pairs" if _share(overall) else "")
    return [("(a) cycle preferences agree with ground truth", *cells)]


def benchmark(report: dict) -> list[Row]:
    """One row per scorer, reward models first."""
    bench = report.get("benchmark", {})
    scorers = sorted({s for t in TASKS for s in bench.get(t) or {}},
                     key=lambda s: (not s.startswith(verdicts.REWARD_PREFIX), s))
    rows = []
    for s in scorers:
        cells = []
        for t in TASKS:
            e = (bench.get(t) or {}).get(s)
            cells.append(f"{_share(e, 'accuracy')} of {e['n']} pairs" if _share(e, "accuracy") else "")
        rows.append((f"(b) benchmark accuracy: {verdicts.name(s)}", *cells))
    return rows


def best_of_n(report: dict) -> list[Row]:
    tasks = report.get("best_of_n", {}).get("tasks") or {}
    found = sorted({v for t in TASKS for v in (tasks.get(t) or {}).get("gain") or {}},
                   key=lambda v: (v != "reward", v))
    n = max((int(x) for t in TASKS for x in (tasks.get(t) or {}).get("n", [])), default=None)
    rows = []
    for v in found:
        cells = [_signed(*((tasks.get(t) or {}).get(k, {}).get(v) for k in ("gain", "gain_low", "gain_high")))
                 for t in TASKS]
        rows.append((f"(c) Best-of-{n or 'N'} F1 gain over N=1, verifier {verdicts.name(v)}", *cells))
    return rows


def downstream(report: dict) -> list[Row]:
    tasks = report.get("downstream", {}).get("tasks") or {}
    cells = [_signed(*((tasks.get(t) or {}).get(k) for k in ("delta", "delta_low", "delta_high"))) for t in TASKS]
    return [("(d) DPO of the captioner / (e) Diffusion-DPO, F1 after - before", *cells)]


def sft_baseline(report: dict) -> list[Row]:
    tasks = report.get("downstream", {}).get("tasks") or {}
    rows = []
    for key, question in (("sft_baseline", "SFT-only baseline, F1 after - before"), ("dpo_vs_sft", "DPO - SFT")):
        cells = [_signed(*((tasks.get(t) or {}).get(key, {}).get(k) for k in ("delta", "delta_low", "delta_high")))
                 for t in TASKS]
        rows.append((f"(d) / (e) {question}", *cells))
    return rows


def label_quality(report: dict) -> list[Row]:
    q = report.get("label_quality") or {}
    decoder, back = q.get("i2t_decoder") or {}, q.get("t2i_back_captioner") or {}
    return [(f"cycle label quality: backward model shows {what}", _share(decoder.get(key)), _share(back.get(key)))
            for key, what in (("exact_scene", "exactly the scene of the text"), ("object_count", "the right object count"))]


ROWS: list[Callable[[dict], list[Row]]] = [agreement, label_quality, benchmark, best_of_n, downstream, sft_baseline]


def block(report: dict) -> str:
    """The generated block, markers included: the table, then the verdicts."""
    rows = [r for rule in ROWS for r in rule(report) if r[1] or r[2]]
    scenes = report.get("inputs_with_truth")
    lines = [BEGIN, "", *([f"Input scenes with ground truth: {scenes}.", ""] if scenes is not None else []),
             "| question | I2T | T2I |", "|---|---|---|", *(f"| {q} | {a} | {b} |" for q, a, b in rows), ""]
    lines += [f"- {line}" for line in verdicts.verdicts(report)]
    return "\n".join([*lines, "", END])


def headline_metrics(report: dict) -> dict[str, dict]:
    """Per task, the stage's DVC metrics in cyclepref.metrics' vocabulary: the reward model's benchmark accuracy
    with its interval, the best baseline other than random on the same pairs, and the pairs."""
    out = {}
    for task in TASKS:
        scores = {k: v for k, v in (report.get("benchmark", {}).get(task) or {}).items()
                  if isinstance(v, dict) and isinstance(v.get("accuracy"), int | float)}
        models = sorted(k for k in scores if k.startswith(verdicts.REWARD_PREFIX))
        if not models:
            continue
        own = scores[verdicts.REWARD_MODEL if verdicts.REWARD_MODEL in scores else models[0]]
        baselines = [v["accuracy"] for k, v in scores.items()
                     if k not in models and k != "random" and not k.endswith("-dense")]
        out[task] = {"accuracy": own["accuracy"], "low": own.get("ci95_low"), "high": own.get("ci95_high"),
                     "rows": own.get("n"), "baseline": max(baselines) if baselines else None}
    return out


def current(text: str) -> str | None:
    """The block in `text` (markers included), None when the markers are missing."""
    start, end = text.find(BEGIN), text.find(END)
    return text[start:end + len(END)] if 0 <= start < end else None


def sync(text: str, report: dict) -> str:
    """`text` with its block replaced by the one `report` gives; a text without the markers is an error."""
    old = current(text)
    if old is None:
        raise ValueError(f"no block between {BEGIN!r} and {END!r}")
    return text.replace(old, block(report), 1)
