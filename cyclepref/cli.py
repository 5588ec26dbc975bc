"""The `cyclepref` command line. Heavy libraries are imported inside commands."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

app = typer.Typer(help="cyclepref: cycle-consistency preference data and reward models.", no_args_is_help=True)
profile_app = typer.Typer(help="Show, validate and switch params profiles (configs/<name>.yaml -> params.yaml).")
app.add_typer(profile_app, name="profile")

CONFIGS = Path("configs")
PARAMS = Path("params.yaml")


def _profiles() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


@profile_app.command("list")
def profile_list() -> None:
    """List the available profiles and mark the active one."""
    from cyclepref.config import load_params

    active = load_params(PARAMS).profile if PARAMS.exists() else None
    for name in _profiles():
        typer.echo(f"{'*' if name == active else ' '} {name}")


@profile_app.command("use")
def profile_use(name: str = typer.Argument(..., help="Profile name: a file configs/<name>.yaml.")) -> None:
    """Validate configs/<name>.yaml and copy it over params.yaml (then `dvc repro` reruns what changed)."""
    from cyclepref.config import ParamsError, load_params

    src = CONFIGS / f"{name}.yaml"
    if not src.exists():
        typer.echo(f"no profile {name!r}; available: {', '.join(_profiles())}", err=True)
        raise typer.Exit(2)
    try:
        load_params(src)
    except ParamsError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    shutil.copyfile(src, PARAMS)
    typer.echo(f"params.yaml <- {src}")


@profile_app.command("check")
def profile_check(path: Path = typer.Argument(PARAMS, help="A params file to validate.")) -> None:
    """Validate a params file against the schema; print every bad key and why."""
    from cyclepref.config import ParamsError, load_params

    try:
        params = load_params(path)
    except ParamsError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{path}: valid (profile {params.profile})")


if __name__ == "__main__":
    app()
