"""The reward model as an MLflow pyfunc: input columns image (binary: encoded image bytes) and text (string),
output column score (double, higher = better aligned).

Over HTTP (`mlflow models serve`) binary columns are sent base64-encoded, e.g.
  {"dataframe_split": {"columns": ["image", "text"], "data": [["<base64 PNG>", "a red square"]]}}
Rows with identical image bytes are decoded once and their image is encoded once per batch.
LIMITS (also in the model signature, as params with these defaults; a request may lower them, never raise them):
images are PNG or JPEG of at most MAX_IMAGE_PIXELS pixels (checked from the header, before anything is decoded),
texts at most MAX_TEXT_CHARS characters. A bad row (another format, too many pixels, a decompression bomb, an image
that cannot be decoded, a null, empty or too long text) or a frame without the columns image and text fails the
request with HTTP 400 and one line naming the row, the cause and the limit, without a stack trace and without echoing
the input; the server stays up. The model directory
travels as the artifact `reward_model`; the cyclepref package travels as code, so loading needs only the pinned
requirements. The model is logged from code (cyclepref/reward/pyfunc_entry.py), so loading it unpickles nothing, and
`load_reward_model` reads only the MLmodel file of a model that is not one of these before refusing it.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from importlib import metadata
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

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


MAX_IMAGE_PIXELS = 4096 * 4096
MAX_TEXT_CHARS = 2000
IMAGE_FORMATS = ("PNG", "JPEG")
LIMITS = {"max_image_pixels": MAX_IMAGE_PIXELS, "max_text_chars": MAX_TEXT_CHARS}


def signature():
    """Columns image (binary) and text (string), both optional in the schema so that a frame without one reaches
    `predict`, which refuses it in one line (MLflow's own schema error repeats the whole input); the limits as params
    with their defaults, and the accepted formats."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image", required=False), ColSpec("string", "text", required=False)]),
        outputs=Schema([ColSpec("double", "score")]),
        params=ParamSchema([ParamSpec(k, "long", v) for k, v in LIMITS.items()]
                           + [ParamSpec("image_formats", "string", ",".join(IMAGE_FORMATS))]),
    )


def limits(params: dict | None) -> dict[str, int]:
    """The limits of one request: LIMITS, or lower values its params ask for."""
    out = dict(LIMITS)
    for key, cap in LIMITS.items():
        value = (params or {}).get(key)
        if value is not None:
            try:
                out[key] = min(int(value), cap)
            except (TypeError, ValueError):
                raise InvalidInput(f"param {key} must be an integer (at most {cap})") from None
    return out


class InvalidInput(MlflowException):
    """A bad input row (HTTP 400). MLflow's scoring server puts the whole input frame in front of an exception's
    message; this message keeps its one line, and it carries no stack trace."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        self.__dict__.setdefault("_message", value)


def row_text(row: int, value: object, max_chars: int = MAX_TEXT_CHARS) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise InvalidInput(f"row {row}: text is null; every row needs a non-empty text")
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"row {row}: text is {'empty' if isinstance(value, str) else type(value).__name__}; "
                           "every row needs a non-empty text")
    if len(value) > max_chars:
        raise InvalidInput(f"row {row}: text has {len(value)} characters; the limit is {max_chars} characters")
    return value


def row_image(row: int, value: object, max_pixels: int = MAX_IMAGE_PIXELS):
    """The RGB image of a row's encoded bytes (never a path: a server reads no files named by its clients), once its
    header says PNG or JPEG of at most `max_pixels` pixels."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(value, bytes | bytearray) or not value:
        got = "nothing" if value is None or value == b"" else type(value).__name__
        raise InvalidInput(f"row {row}: image must be the bytes of a PNG or JPEG file (base64 over HTTP), got {got}")
    too_many = f"row {row}: image has more than {max_pixels} pixels; the limit is {max_pixels} pixels"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(value), formats=IMAGE_FORMATS) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise InvalidInput(f"row {row}: image is {width}x{height} = {width * height} pixels; the limit "
                                       f"is {max_pixels} pixels")
                im.load()
                return im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidInput(too_many) from None
    except UnidentifiedImageError:
        raise InvalidInput(f"row {row}: image is not a PNG or JPEG file ({len(value)} bytes); the formats accepted "
                           f"are {', '.join(IMAGE_FORMATS)}") from None
    except InvalidInput:
        raise
    except Exception as err:
        raise InvalidInput(f"row {row}: image cannot be decoded ({type(err).__name__}: "
                           f"{' '.join(str(err).split())[:200]})") from None


class RewardPyfunc(mlflow.pyfunc.PythonModel):
    """Scores (image, text) rows with a RewardModel loaded from the `reward_model` artifact."""

    batch_size = 32

    def load_context(self, context) -> None:
        from cyclepref import runtime
        from cyclepref.reward.model import RewardModel

        model = RewardModel.from_pretrained(context.artifacts[ARTIFACT])
        self.model = runtime.place(model, "blip_itm", keep_float=("head",)).eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            raise InvalidInput(f"reward model input must be a table with columns image and text, got "
                               f"{type(model_input).__name__}")
        missing = [c for c in ("image", "text") if c not in model_input.columns]
        if missing:
            raise InvalidInput(f"reward model input needs columns image and text; missing {missing} "
                               f"({len(model_input.columns)} column(s) given)")
        limit = limits(params)
        texts = [row_text(i, t, limit["max_text_chars"]) for i, t in enumerate(model_input["text"])]
        cache: dict[str, object] = {}
        images = []
        for i, raw in enumerate(model_input["image"]):
            key = hashlib.sha256(raw).hexdigest() if isinstance(raw, bytes | bytearray) else None
            if key not in cache:
                cache[key] = row_image(i, raw, limit["max_image_pixels"])
            images.append(cache[key])
        scores = self.model.score(images, texts, batch_size=self.batch_size)
        return pd.DataFrame({"score": scores.double().numpy()})


def project_path(path: str | Path) -> str:
    """`path` relative to the working directory (the project root) when inside it, so the MLmodel file that
    records it names no checkout; else absolute."""
    path = Path(path).resolve()
    cwd = Path.cwd().resolve()
    return str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path)


def log_reward_model(model_dir: str | Path, name: str = "reward_model", input_example: pd.DataFrame | None = None):
    """Log a RewardModel directory as a pyfunc in the active run; returns mlflow's ModelInfo."""
    import cyclepref

    package = Path(cyclepref.__file__).resolve().parent
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=project_path(package / "reward" / "pyfunc_entry.py"),
        artifacts={ARTIFACT: project_path(model_dir)},
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
    from cyclepref.tracking import use_store

    use_store()
    check_reward_mlmodel(uri)
    wrapped = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    if not isinstance(wrapped, RewardPyfunc):
        raise RewardModelError(f"{uri}: not a cyclepref reward model (python model is {type(wrapped).__name__})")
    return wrapped.model
