"""The reward model as an MLflow pyfunc: input columns image (binary: encoded image bytes) and text (string),
output column score (double, higher = better aligned).

Over HTTP (`mlflow models serve`) binary columns are sent base64-encoded, e.g.
  {"dataframe_split": {"columns": ["image", "text"], "data": [["<base64 PNG>", "a red square"]]}}
Rows with identical image bytes are decoded once and their image is encoded once per batch. The model directory
travels as the artifact `reward_model`; the cyclepref package travels as code, so loading needs only the pinned
requirements. The model is logged from code (cyclepref/reward/pyfunc_entry.py), so loading it unpickles nothing, and
`load_reward_model` reads only the MLmodel file of a model that is not one of these before refusing it.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

import mlflow
import pandas as pd

ARTIFACT = "reward_model"
ENTRY = "pyfunc_entry.py"
CODE_LOADER = "mlflow.pyfunc.loaders.code_model"
METADATA = {"cyclepref_model": "reward"}
REQUIREMENTS = (
    "torch",
    "torchvision",
    "transformers",
    "tokenizers",
    "safetensors",
    "huggingface_hub",
    "pillow",
    "numpy",
    "pandas",
    "pydantic",
    "PyYAML",
    "mlflow",
)


def pinned_requirements() -> list[str]:
    """name==version for the packages the pyfunc imports, as installed here (local version labels dropped)."""
    return [f"{name}=={metadata.version(name).split('+', 1)[0]}" for name in REQUIREMENTS]


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image"), ColSpec("string", "text")]),
        outputs=Schema([ColSpec("double", "score")]),
    )


class RewardPyfunc(mlflow.pyfunc.PythonModel):
    """Scores (image, text) rows with a RewardModel loaded from the `reward_model` artifact."""

    batch_size = 32

    def load_context(self, context) -> None:
        from cyclepref import runtime
        from cyclepref.reward.model import RewardModel

        self.model = RewardModel.from_pretrained(context.artifacts[ARTIFACT]).to(runtime.device()).eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from cyclepref.reward.data import decode

        missing = [c for c in ("image", "text") if c not in model_input.columns]
        if missing:
            raise ValueError(f"reward model input needs columns image and text; missing {missing}")
        cache: dict[str, object] = {}
        images = []
        for raw in model_input["image"]:
            key = hashlib.sha256(bytes(raw)).hexdigest()
            if key not in cache:
                cache[key] = decode(bytes(raw))
            images.append(cache[key])
        scores = self.model.score(images, [str(t) for t in model_input["text"]], batch_size=self.batch_size)
        return pd.DataFrame({"score": scores.double().numpy()})


def log_reward_model(model_dir: str | Path, name: str = "reward_model", input_example: pd.DataFrame | None = None):
    """Log a RewardModel directory as a pyfunc in the active run; returns mlflow's ModelInfo."""
    import cyclepref

    package = Path(cyclepref.__file__).resolve().parent
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(package / "reward" / "pyfunc_entry.py"),
        artifacts={ARTIFACT: str(Path(model_dir).resolve())},
        signature=signature(),
        input_example=input_example,
        pip_requirements=pinned_requirements(),
        code_paths=[str(package)],
        metadata=METADATA,
    )


class RewardModelError(ValueError):
    """A location that holds no cyclepref reward model: missing, unreadable, or another kind of model."""


def check_reward_mlmodel(uri: str) -> None:
    """Raise RewardModelError unless the MLmodel file at `uri` (the only file read) describes a reward model logged
    by `log_reward_model`: the pyfunc flavor built from code (ENTRY, no pickled python model), the `reward_model`
    artifact, and METADATA when the model carries metadata."""
    from mlflow.models import Model

    try:
        mlmodel = Model.load(uri)
    except Exception as err:
        raise RewardModelError(f"{uri}: no readable MLflow model ({type(err).__name__}: {err})") from None
    flavor = mlmodel.flavors.get("python_function") or {}
    problems = []
    if flavor.get("loader_module") != CODE_LOADER:
        problems.append(f"loader {flavor.get('loader_module')!r}")
    if "python_model" in flavor:
        problems.append("a pickled python model")
    if Path(str(flavor.get("model_code_path", ""))).name != ENTRY:
        problems.append(f"code {flavor.get('model_code_path')!r}")
    if ARTIFACT not in (flavor.get("artifacts") or {}):
        problems.append(f"no {ARTIFACT!r} artifact")
    if mlmodel.metadata and any(mlmodel.metadata.get(k) != v for k, v in METADATA.items()):
        problems.append(f"metadata {mlmodel.metadata!r}")
    if problems:
        raise RewardModelError(f"{uri}: not a cyclepref reward model ({'; '.join(problems)}); nothing was loaded")


def load_reward_model(uri: str):
    """A RewardModel from a directory, an MLflow model directory, or an MLflow URI (models:/name@alias, runs:/...).
    An MLflow model is checked (check_reward_mlmodel) before anything of it is loaded; RewardModelError otherwise."""
    from cyclepref.reward.model import CONFIG_FILE, RewardModel

    path = Path(uri)
    if path.is_dir() and (path / CONFIG_FILE).exists():
        return RewardModel.from_pretrained(path)
    if "://" not in uri and not uri.startswith(("models:", "runs:")) and not path.exists():
        raise RewardModelError(f"{uri}: no such model directory (or pass an MLflow URI such as models:/name@alias)")
    from cyclepref.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    check_reward_mlmodel(uri)
    wrapped = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    if not isinstance(wrapped, RewardPyfunc):
        raise RewardModelError(f"{uri}: not a cyclepref reward model (python model is {type(wrapped).__name__})")
    return wrapped.model
