"""One module per DVC stage: `python -m tasks.<stage>` (run from the project root, reads params.yaml).

Each module has `run(params, root) -> summary` (the stage, callable from tests) and `main()` (the CLI entry point
that adds MLflow tracking and prints the one-line summary).
"""
