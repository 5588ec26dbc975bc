"""The `cyclepref` command line. Heavy libraries are imported inside commands."""

from __future__ import annotations

import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import typer

app = typer.Typer(help="cyclepref: cycle-consistency preference data and reward models.", no_args_is_help=True)
profile_app = typer.Typer(help="Show, validate and switch params profiles (configs/<name>.yaml -> params.yaml).")
app.add_typer(profile_app, name="profile")
ui_app = typer.Typer(help="Start the project's MLflow or Prefect UI (from anywhere inside the project).",
                     no_args_is_help=True)
app.add_typer(ui_app, name="ui")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"cyclepref {version('cyclepref')}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """cyclepref: cycle-consistency preference data and reward models."""

CONFIGS = Path("configs")
PARAMS = Path("params.yaml")
DVC_FILE = Path("dvc.yaml")


def _profiles() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


@profile_app.command("list")
def profile_list() -> None:
    """List the available profiles and mark the active one."""
    from cyclepref.config import load_params

    active = load_params(PARAMS).profile if PARAMS.exists() else None
    for name in _profiles():
        typer.echo(f"{'*' if name == active else ' '} {name}")


DVC_FILE_OPTION = typer.Option(DVC_FILE, "--dvc-file", help="The pipeline whose stages' sections must be present.")


def _checked(path: Path, dvc_file: Path):
    """The params of `path`, valid against the schema and holding every section dvc_file's stages read; else exit 2
    with every bad key or missing section and why."""
    from cyclepref.config import ParamsError, load_params
    from cyclepref.profiles import require_ingest_home, require_pinned, require_pinned_datasets, require_sections

    try:
        params = load_params(path)
        if dvc_file.exists():
            require_sections(params, dvc_file, str(path))
            require_ingest_home(params, dvc_file, str(path))
        require_pinned(params, str(path), Path.cwd())
        require_pinned_datasets(params, str(path))
    except ParamsError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    return params


@profile_app.command("use")
def profile_use(
    name: str = typer.Argument(..., help="Profile name: a file configs/<name>.yaml."), dvc_file: Path = DVC_FILE_OPTION
) -> None:
    """Validate configs/<name>.yaml and copy it over params.yaml (then `dvc repro` reruns what changed)."""
    src = CONFIGS / f"{name}.yaml"
    if not src.exists():
        typer.echo(f"no profile {name!r}; available: {', '.join(_profiles())}", err=True)
        raise typer.Exit(2)
    _checked(src, dvc_file)
    shutil.copyfile(src, PARAMS)
    typer.echo(f"params.yaml <- {src}")


@profile_app.command("check")
def profile_check(
    path: Path = typer.Argument(PARAMS, help="A params file to validate."), dvc_file: Path = DVC_FILE_OPTION
) -> None:
    """Validate a params file against the schema and the stages of dvc.yaml; print every bad key, missing section,
    missing local model, and every entry under a stage's deps that DVC cannot hash (the preflight)."""
    from cyclepref.config import ParamsError
    from cyclepref.preflight import require_clean
    from cyclepref.profiles import missing_models

    params = _checked(path, dvc_file)
    missing = missing_models(params, Path.cwd(), dvc_file)
    if missing:
        typer.echo(f"{path}: local model path(s) not found:\n" + "\n".join(f"  {m}" for m in missing), err=True)
        raise typer.Exit(2)
    if dvc_file.exists():
        try:
            require_clean(Path.cwd(), dvc_file, params)
        except ParamsError as err:
            typer.echo(str(err), err=True)
            raise typer.Exit(2) from None
    typer.echo(f"{path}: valid (profile {params.profile})")


@app.command("score")
def score(
    images: list[Path] | None = typer.Argument(None, help="Image files to score."),
    model: str = typer.Option(
        ..., "--model", "-m", help="RewardModel directory, MLflow model directory or URI (models:/name@alias, runs:/)."
    ),
    text: list[str] | None = typer.Option(
        None, "--text", "-t", help="One text for every image, one per image, or several texts for a single image."
    ),
    jsonl: Path | None = typer.Option(
        None, "--jsonl", help='Batch mode: lines {"image": path, "text": str} (paths relative to the file); '
        'prints each line with "score" added.'
    ),
    batch_size: int = typer.Option(32, min=1, help="Pairs per forward pass."),
    fmt: str | None = typer.Option(
        None, "--format", help="tsv: a header line, then score, image, text per pair (default); json: one JSON "
        "object per pair (default with --jsonl: each input line with \"score\" added)."
    ),
) -> None:
    """Print reward scores (higher = better aligned) for image-text pairs."""
    import json

    from cyclepref.reward.data import decode
    from cyclepref.reward.pyfunc import load_reward_model

    fmt = fmt or ("json" if jsonl is not None else "tsv")
    if fmt not in ("tsv", "json"):
        typer.echo(f"--format must be tsv or json, got {fmt!r}", err=True)
        raise typer.Exit(2)
    if jsonl is not None:
        if images or text:
            typer.echo("--jsonl replaces IMAGE... and --text; give one or the other", err=True)
            raise typer.Exit(2)
        rows = _read_jsonl(jsonl)
        bad = [i + 1 for i, r in enumerate(rows) if not all(isinstance(r.get(k), str) for k in ("image", "text"))]
        if bad:
            typer.echo(f"{jsonl}: lines {bad[:10]} need string fields 'image' and 'text'", err=True)
            raise typer.Exit(2)
        paths = [jsonl.parent / r["image"] for r in rows]
        texts = [r["text"] for r in rows]
    else:
        rows = None
        paths, texts = list(images or []), list(text or [])
        if not paths or not texts:
            typer.echo("give IMAGE... and --text (or --jsonl FILE)", err=True)
            raise typer.Exit(2)
        if len(texts) == 1:
            texts = texts * len(paths)
        elif len(paths) == 1:
            paths = paths * len(texts)
        elif len(paths) != len(texts):
            typer.echo(f"{len(paths)} images but {len(texts)} texts: give one text, one image or as many", err=True)
            raise typer.Exit(2)
    decoded: dict[Path, object] = {}
    for p in paths:
        if p not in decoded:
            try:
                decoded[p] = decode(p)
            except Exception as err:
                typer.echo(f"{p}: cannot read image ({_one_line(err)})", err=True)
                raise typer.Exit(2) from None
    try:
        reward = load_reward_model(model)
    except Exception as err:
        typer.echo(f"--model {model}: cannot load a reward model ({_one_line(err)})", err=True)
        raise typer.Exit(2) from None
    scores = reward.score([decoded[p] for p in paths], texts, batch_size=batch_size).tolist()
    rows = rows or [{"image": str(p), "text": t} for p, t in zip(paths, texts, strict=True)]
    if fmt == "json":
        for row, s in zip(rows, scores, strict=True):
            typer.echo(json.dumps(row | {"score": s}, ensure_ascii=False))
        return
    typer.echo("score\timage\ttext")
    for p, t, s in zip(paths, texts, scores, strict=True):
        typer.echo(f"{s:.6f}\t{p}\t{' '.join(t.split())}")


def _read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a jsonl file; a missing file or a bad line exits 2 with one line naming it."""
    import json

    try:
        lines = path.read_text().splitlines()
    except (OSError, ValueError) as err:
        typer.echo(f"{path}: cannot read ({_one_line(err)})", err=True)
        raise typer.Exit(2) from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            typer.echo(f"{path}:{n}: not valid JSON ({_one_line(err)})", err=True)
            raise typer.Exit(2) from None
        if not isinstance(row, dict):
            typer.echo(f"{path}:{n}: expected a JSON object", err=True)
            raise typer.Exit(2)
        rows.append(row)
    return rows


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def _project(root: Path) -> Path:
    """The project root, importable (flows/ and tasks/ live there, beside dvc.yaml)."""
    import sys

    root = root.resolve()
    if not (root / "dvc.yaml").exists():
        typer.echo(f"{root}: no dvc.yaml here (run from the project root or pass --root)", err=True)
        raise typer.Exit(2)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


@contextmanager
def _sigterm_exits():
    """SIGTERM ends the command with SystemExit(143) instead of killing it: exit handlers run, and Prefect stops the
    temporary API server it started for the flow (a process the signal kills leaves that server running)."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _flow_failed(err: Exception) -> typer.Exit:
    from flows.pipeline import ConfigError

    typer.echo(f"{type(err).__name__}: {err}", err=True)
    return typer.Exit(2 if isinstance(err, ConfigError) else 1)


ROOT_OPTION = typer.Option(Path("."), "--root", help="Project root (dvc.yaml, params.yaml).")
TIMEOUT_OPTION = typer.Option(None, "--timeout-s", help="Hard limit per stage, s (default $CYCLEPREF_STAGE_TIMEOUT_S).")
RETRIES_OPTION = typer.Option(None, "--retries", min=0, help="Retries after a transient failure (default 2).")


@app.command("pipeline")
def pipeline_cmd(
    root: Path = ROOT_OPTION, timeout_s: float | None = TIMEOUT_OPTION, retries: int | None = RETRIES_OPTION,
    record: bool = typer.Option(False, "--record", help="Record a new flow run even when nothing changed."),
) -> None:
    """Run every DVC stage as a Prefect flow (one task per stage), with an MLflow parent run and a child per stage.
    When DVC has nothing to run and the last completed pipeline run recorded this dvc.lock, say so and stop."""
    root = _project(root)
    from flows import uptodate

    last = None if record else uptodate.current(root)
    if last is not None:
        typer.echo(f"Pipeline up to date: {last.stages} stages, nothing to run. This state is recorded by MLflow "
                   f"run {last.parent_run_id} ({last.recorded_by}, {last.finished_utc}); --record records a new run.")
        return
    from flows.pipeline import pipeline

    try:
        with _sigterm_exits():
            result = pipeline(root=str(root), trigger="cli", stage_timeout_s=timeout_s, stage_retries=retries)
    except Exception as err:
        raise _flow_failed(err) from None
    for o in result.outcomes:
        typer.echo(f"{o.stage}\t{o.status}\t{o.seconds:.1f}s\t{o.child_run_id}")
    typer.echo(f"MLflow pipeline run: {result.parent_run_id}")


@app.command("repro")
def repro_cmd(
    targets: list[str] | None = typer.Argument(None, help="Stages or outputs for `dvc repro` (default: all)."),
    root: Path = ROOT_OPTION,
) -> None:
    """`dvc repro` with MLflow lineage: one parent run, every stage a child (executed, or skipped and pointing to
    the run that made its outputs). `make run` runs this, then `cyclepref register`."""
    root = _project(root)
    from cyclepref.config import ParamsError
    from flows.repro import repro

    try:
        result = repro(root, list(targets or []))
    except ParamsError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    ran = sum(s == "executed" for s in result.statuses.values())
    typer.echo(f"MLflow run {result.parent_run_id}: {ran} stage(s) run, {len(result.statuses) - ran} up to date")
    if result.returncode:
        raise typer.Exit(result.returncode)


@app.command("register")
def register_cmd(root: Path = ROOT_OPTION) -> None:
    """Register the reward model of the current DVC outputs (one version per output, tagged with the DVC stage hash,
    git commit and data digest), link the DPO adapters to it, and take the champion decision of a retraining round:
    with no champion yet it becomes `champion` only when it clears the floor on the frozen benchmark."""
    root = _project(root)
    from contextlib import chdir

    from cyclepref.config import ParamsError, load_params, require
    from flows import lineage
    from flows.retrain import register_and_decide

    try:
        cfg = require(load_params(root / "params.yaml").retrain, "retrain")
    except ParamsError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    with chdir(root):
        client = lineage.client(root)
        try:
            reg, decided = register_and_decide(client, root, cfg)
        except LookupError as err:
            typer.echo(f"nothing registered: {err}", err=True)
            return
        lineage.describe_version(client, reg.name, reg.version)
    state = "registered" if reg.created else "already registered"
    linked = ", ".join(f"{s} {m}" for s, m in reg.adapters.items()) or "none"
    typer.echo(f"{reg.name} version {reg.version} {state} (train run {reg.train_run_id}; adapters: {linked})")
    verdict = "champion" if decided.decision.promote else "not promoted"
    typer.echo(f"{verdict}: {decided.decision.reason}")


@app.command("import-checkpoint")
def import_checkpoint_cmd(
    checkpoint: Path = typer.Argument(..., help="An authors' CycleReward-*.pth state dict."),
    backbone: str = typer.Option(
        "Salesforce/blip-itm-large-coco", "--backbone", help="Template BLIP ITM checkpoint (tokenizer, processor)."
    ),
    name: str = typer.Option("cyclereward-authors", "--name", help="Registered model name."),
    out: Path | None = typer.Option(None, "--out", help="RewardModel directory (default data/reward/authors/<stem>)."),
    root: Path = ROOT_OPTION,
) -> None:
    """Import an authors' released CycleReward checkpoint: convert its keys, save it as a reward model directory, log
    it to MLflow and register it as a new version of NAME (no alias moves)."""
    from contextlib import chdir

    from cyclepref.models import ModelLoadError
    from cyclepref.reward.authors_keys import AuthorsCheckpointError, register_authors_checkpoint

    checkpoint, root = checkpoint.resolve(), root.resolve()
    target = out.resolve() if out else root / "data" / "reward" / "authors" / checkpoint.stem
    with chdir(root):
        try:
            registered, version = register_authors_checkpoint(checkpoint, backbone, name, target)
        except (AuthorsCheckpointError, ModelLoadError, FileNotFoundError) as err:
            typer.echo(_one_line(err), err=True)
            raise typer.Exit(2) from None
    typer.echo(f"{registered} version {version} registered from {checkpoint.name} (model directory {target})")


@app.command("report")
def report_cmd(
    root: Path = ROOT_OPTION,
    out: Path = typer.Option(Path("reports/report.html"), "--out", "-o", help="Where to write the page."),
    examples: int = typer.Option(3, min=0, help="Inputs shown per task with their candidates."),
    readme: bool = typer.Option(True, "--readme/--no-readme", help="Also regenerate README.md's sandbox numbers "
                                "from reports/sandbox.json."),
) -> None:
    """Write one offline HTML page (images embedded, no network): verdicts, headline numbers, gates, examples with
    their cycle scores, reward accuracies, Best-of-N curves; and README.md's sandbox numbers."""
    root = _project(root)
    from cyclepref import store
    from cyclepref.report import build, sync_readme

    path = out if out.is_absolute() else root / out
    with store.atomic_path(path) as tmp:
        tmp.write_text(build(root, examples))
    typer.echo(str(path))
    if readme and sync_readme(root):
        typer.echo(str(root / "README.md"))


@app.command("retrain")
def retrain_cmd(
    root: Path = ROOT_OPTION,
    ingest: bool = typer.Option(True, "--ingest/--no-ingest", help="Move new inputs from retrain.watch_dir first."),
    timeout_s: float | None = TIMEOUT_OPTION,
    retries: int | None = RETRIES_OPTION,
) -> None:
    """Ingest new inputs, run the pipeline, register the reward model and promote it if it beats the champion."""
    root = _project(root)
    from flows.retrain import retrain

    try:
        with _sigterm_exits():
            out = retrain(root=str(root), ingest=ingest, trigger="cli", stage_timeout_s=timeout_s,
                          stage_retries=retries)
    except Exception as err:
        raise _flow_failed(err) from None
    verdict = "promoted" if out.decision.promote else "kept champion"
    typer.echo(f"{out.registered_model} v{out.challenger_version}: {verdict} ({out.decision.reason})")
    typer.echo(f"ingested {out.ingested or 'nothing'}; round time {out.seconds:.1f} s (reports/retrain_rounds.md)")


@app.command("arrivals")
def arrivals_cmd(
    n: int = typer.Argument(..., min=1, help="How many new world scenes to render."),
    seed: int | None = typer.Option(None, "--seed", help="Stream seed (default: the next unused one, from 1000)."),
    root: Path = ROOT_OPTION,
) -> None:
    """Simulate arriving inputs in the sandbox: render N new world scenes (the pipeline part of the world, none of
    make_world's, the benchmark's or the training scenes) into retrain.watch_dir, for the next `cyclepref retrain`."""
    root = _project(root)
    from cyclepref.config import ParamsError, load_params, require
    from cyclepref.world.arrivals import render_arrivals

    try:
        params = load_params(root / "params.yaml")
        cfg = require(params.retrain, "retrain")
        world = require(params.world, "world")
    except ParamsError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    if not cfg.watch_dir:
        typer.echo("retrain.watch_dir is not set: nowhere to put arrivals", err=True)
        raise typer.Exit(2)
    out = render_arrivals(root / cfg.watch_dir, n, world.inputs.n, world.inputs.seed, seed)
    typer.echo(f"{out['scenes']} new scenes (seed {out['seed']}) in {cfg.watch_dir}/{out['folder']}")


@app.command("serve-schedule")
def serve_schedule_cmd(
    root: Path = ROOT_OPTION,
    cron: str | None = typer.Option(None, help="Cron schedule (default $CYCLEPREF_RETRAIN_CRON or '0 3 * * *')."),
    timezone: str | None = typer.Option(None, help="Schedule time zone (default $CYCLEPREF_RETRAIN_TIMEZONE or UTC)."),
    name: str = typer.Option("retrain-schedule", help="Deployment name."),
) -> None:
    """Serve the retraining flow on its cron schedule (one run at a time) until interrupted; needs PREFECT_API_URL."""
    root = _project(root)
    import os

    os.chdir(root)
    from flows.deploy import serve_schedule

    serve_schedule(root, cron, timezone, name)


HOST_OPTION = typer.Option("127.0.0.1", "--host", help="Address to bind.")
PORT_OPTION = typer.Option(None, "--port", help="Port (default: the usual one when free, else any free port).")


def _ui(kind: str, host: str, port: int | None) -> None:
    from cyclepref.ui import UIError, project_root, serve

    try:
        serve(kind, project_root(), host, port, echo=typer.echo)
    except UIError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None


@ui_app.command("mlflow")
def ui_mlflow(host: str = HOST_OPTION, port: int | None = PORT_OPTION) -> None:
    """The MLflow UI on this project's store (runs, artifacts, registered models), opened on the cyclepref
    experiment's runs; Ctrl-C stops it and every process it started."""
    _ui("mlflow", host, port)


@ui_app.command("prefect")
def ui_prefect(host: str = HOST_OPTION, port: int | None = PORT_OPTION) -> None:
    """The Prefect server and UI (flow runs, task runs, artifacts), working on any port; Ctrl-C stops it."""
    _ui("prefect", host, port)


if __name__ == "__main__":
    app()
