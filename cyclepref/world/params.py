"""The schema of the world models' training (params `world.train`, stage train_world@<model>).

It lives beside the trainers, apart from cyclepref/config.py, so that train_world's dependencies are what decides
the weights (this schema, the trainers, the world) and not the whole params schema: an edit to another stage's
section never retrains the world models. cyclepref/config.py includes it in the full schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorldModelTraining(Section):
    """What every world model's training run takes (cyclepref.world.train_*)."""

    scenes: int = Field(10000, gt=0, description="Distinct training scenes (never pipeline or benchmark scenes).")
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0.0)


class WorldLadderTraining(WorldModelTraining):
    """One training run saved at each of `steps`: a ladder of models of increasing quality."""

    steps: list[PositiveInt] = Field(min_length=1, description="Strictly increasing steps at which a model is saved.")

    @model_validator(mode="after")
    def _increasing(self) -> WorldLadderTraining:
        if any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError(f"steps must be strictly increasing, got {self.steps}")
        return self


class WorldT2ITraining(WorldLadderTraining):
    """The sandbox text-to-image ladder: a VAE first, then UNet + text encoder saved at each of `steps`."""

    vae_steps: int = Field(gt=0)
    vae_lr: float = Field(1e-3, gt=0.0)


class WorldOneModelTraining(WorldModelTraining):
    """A model saved once, after `steps` (the CLIP; the BLIP ITM backbone of the reward model)."""

    steps: int = Field(gt=0)
    texts: list[Literal["dense", "alt"]] = Field(
        default_factory=lambda: ["dense"], min_length=1,
        description="One model per kind of training text: dense (captions and paraphrases) into <model>/, alt "
        "(web-like alt-text, cyclepref.world.alttext) into <model>-alt/.")


class WorldTraining(Section):
    """Training of the sandbox's world models (stage train_world@<model>), all from `seed`."""

    seed: NonNegativeInt = 0
    captioner: WorldLadderTraining
    clip: WorldOneModelTraining
    t2i: WorldT2ITraining
    blip: WorldOneModelTraining


def load_training(params_file: str | Path) -> WorldTraining:
    """`world.train` of a params file, validated; ValueError with one line naming the key on a bad value."""
    try:
        raw = yaml.safe_load(Path(params_file).read_text()) or {}
        return WorldTraining.model_validate(raw["world"]["train"])
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise ValueError(f"{params_file}: no readable world.train section ({type(err).__name__}: {err})") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ValueError(f"{params_file}: world.train.{where}: {first['msg']}") from None
