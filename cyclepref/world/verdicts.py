"""The sandbox report's findings in plain words, computed from reports/sandbox.json (cyclepref.world.report).

Each rule reads the keys it needs by name and says nothing when they are absent, so a report of another profile or
an older layout gets the verdicts it can support. A comparison of two numbers with 95% intervals is "above" /
"below" only when the intervals do not overlap; otherwise the two are "not distinguishable" on these pairs. A gain
is a change only when its interval excludes 0. To add a verdict, write a rule `rule(report) -> list[str]` and append
it to RULES.
"""

from __future__ import annotations

from collections.abc import Callable

TASKS = {"i2t": "I2T", "t2i": "T2I"}
NAMES = {"cycle": "raw cycle consistency", "clipscore": "CLIPScore", "random": "random",
         "backbone-itc": "its backbone zero-shot (ITC)", "backbone-itm": "its backbone zero-shot (ITM)",
         "clipscore-dense": "CLIPScore of the dense-caption CLIP",
         "backbone-itc-dense": "ITC of the dense-caption BLIP"}
REWARD_PREFIX = "cyclereward-"
REWARD_MODEL = "cyclereward-combo"


def name(scorer: str) -> str:
    return NAMES.get(scorer, scorer)


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def compare(a: dict, b: dict) -> str:
    """'above', 'below' or 'not distinguishable from': a's interval against b's (ci95_low / ci95_high)."""
    if a["ci95_low"] > b["ci95_high"]:
        return "above"
    if a["ci95_high"] < b["ci95_low"]:
        return "below"
    return "not distinguishable from"


def change(what: str, value: float, low: float, high: float) -> str:
    """A gain of `what` with its interval in words."""
    span = f"{value:+.3f} [{low:+.3f}, {high:+.3f}]"
    if low > 0:
        return f"raised {what} by {span}"
    if high < 0:
        return f"lowered {what} by {span}"
    return f"did not change {what} beyond noise ({span})"


def _interval(entry: dict | None, key: str = "value") -> dict | None:
    """{value, ci95_low, ci95_high} of an entry that has them all as numbers, else None."""
    if not isinstance(entry, dict):
        return None
    out = {"value": entry.get(key), "ci95_low": entry.get("ci95_low"), "ci95_high": entry.get("ci95_high")}
    return out if all(isinstance(v, int | float) for v in out.values()) else None


def agreement(report: dict) -> list[str]:
    out = []
    for task, label in TASKS.items():
        e = _interval((report.get("agreement", {}).get(task) or {}).get("overall"))
        if e is None:
            continue
        side = {"above": "above chance", "below": "below chance"}.get(
            compare(e, {"ci95_low": 0.5, "ci95_high": 0.5}), "not distinguishable from chance")
        out.append(f"{label} cycle preferences agree with ground truth on {pct(e['value'])} "
                   f"[{pct(e['ci95_low'])}, {pct(e['ci95_high'])}] of pairs: {side}.")
    return out


def benchmark(report: dict) -> list[str]:
    """The reward model (Combo, else the first reward model) against every baseline on the frozen benchmark."""
    out = []
    for task, label in TASKS.items():
        scores = {k: _interval(v, "accuracy") for k, v in (report.get("benchmark", {}).get(task) or {}).items()}
        scores = {k: v for k, v in scores.items() if v is not None}
        models = sorted(k for k in scores if k.startswith(REWARD_PREFIX))
        if not models:
            continue
        model = REWARD_MODEL if REWARD_MODEL in scores else models[0]
        groups: dict[str, list[str]] = {}
        for other in sorted(k for k in scores if not k.startswith(REWARD_PREFIX)):
            groups.setdefault(compare(scores[model], scores[other]), []).append(
                f"{name(other)} ({pct(scores[other]['value'])})")
        parts = [f"{side} {' and '.join(names)}" for side in ("above", "not distinguishable from", "below")
                 if (names := groups.get(side))]
        if parts:
            out.append(f"On the {label} benchmark the reward model ({model}, {pct(scores[model]['value'])}) is "
                       + "; ".join(parts) + ".")
    return out


def best_of_n(report: dict, verifier: str = "reward") -> list[str]:
    out = []
    for task, label in TASKS.items():
        sec = (report.get("best_of_n", {}).get("tasks") or {}).get(task) or {}
        values = [sec.get(k, {}).get(verifier) for k in ("gain", "gain_low", "gain_high")]
        if not all(isinstance(v, int | float) for v in values):
            continue
        n = max((int(x) for x in sec.get("n", [])), default=None)
        what = f"Best-of-{n}" if n else "Best-of-N"
        out.append(f"{label} {what} with the reward model as verifier {change(_judge(sec) + ' F1', *values)} "
                   "over N=1.")
    return out


def _judge(sec: dict) -> str:
    return "ground-truth" if sec.get("evaluator", "ground_truth") == "ground_truth" else str(sec["evaluator"])


DOWNSTREAM = {"i2t": "DPO of the captioner", "t2i": "Diffusion-DPO of the text-to-image model"}


def downstream(report: dict) -> list[str]:
    out = []
    for task, what in DOWNSTREAM.items():
        sec = (report.get("downstream", {}).get("tasks") or {}).get(task) or {}
        values = [sec.get(k) for k in ("delta", "delta_low", "delta_high")]
        if not all(isinstance(v, int | float) for v in values):
            continue
        judge = _judge({"evaluator": report["downstream"].get("evaluator", "ground_truth")})
        out.append(f"{what} {change(judge + ' F1', *values)} on {sec.get('n', '?')} held-out inputs.")
        sft = [(sec.get("sft_baseline") or {}).get(k) for k in ("delta", "delta_low", "delta_high")]
        vs = [(sec.get("dpo_vs_sft") or {}).get(k) for k in ("delta", "delta_low", "delta_high")]
        if all(isinstance(v, int | float) for v in sft + vs):
            out.append(f"Its SFT-only baseline on the same chosen outputs {change(judge + ' F1', *sft)}; DPO against "
                       f"that baseline: {vs[0]:+.3f} [{vs[1]:+.3f}, {vs[2]:+.3f}].")
    return out


RULES: list[Callable[[dict], list[str]]] = [agreement, benchmark, best_of_n, downstream]


def verdicts(report: dict) -> list[str]:
    """Every rule's sentences, in RULES order."""
    return [line for rule in RULES for line in rule(report)]


def markdown(report: dict) -> list[str]:
    """The verdicts as a markdown list under a heading (no lines when there is nothing to say)."""
    lines = verdicts(report)
    return ["## Verdicts", "", *(f"- {line}" for line in lines), ""] if lines else []
