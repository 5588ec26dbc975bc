"""Verifiers behind one interface: `score(images, texts) -> tensor[B]` for aligned (image, text) pairs, batched,
higher is better.

- reward:    the trained reward model (cyclepref.reward.model.RewardModel).
- clipscore: cosine of open_clip image and text embeddings.
- cycle:     raw cycle consistency. I2T (image, caption): render the caption with the profile's backward
             text-to-image model (params reconstruct_i2t) and compare it with the image by the profile's image
             metric (score_i2t), oriented so that higher is better. T2I (image, prompt): back-caption the image with
             the profile's captioner (reconstruct_t2i) and compare with the prompt by SBERT (score_t2i).
Each distinct image object and each distinct text of a call is embedded (or rendered) once.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from cyclepref.config import CaptionerSpec, ImageMetricSpec, Params, T2ISpec, TextMetricSpec
from cyclepref.scoring import oriented
from cyclepref.workstore import key_of, seed_of


class Verifier(Protocol):
    name: str

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor: ...


def _unique(items: Sequence, key=lambda x: x) -> tuple[list, list[int]]:
    """Distinct items (first occurrence order) and, per item, the index of its distinct item."""
    slot: dict[Hashable, int] = {}
    unique, index = [], []
    for it in items:
        k = key(it)
        if k not in slot:
            slot[k] = len(unique)
            unique.append(it)
        index.append(slot[k])
    return unique, index


def _check(images: Sequence, texts: Sequence) -> None:
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")


class RewardVerifier:
    name = "reward"

    def __init__(self, model, batch_size: int = 32):
        self.model, self.batch_size = model, batch_size

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        _check(images, texts)
        return self.model.score(list(images), list(texts), batch_size=self.batch_size).float()


class ClipVerifier:
    name = "clipscore"

    def __init__(self, embedder, batch_size: int = 32):
        self.embedder, self.batch_size = embedder, batch_size

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        _check(images, texts)
        uniq_im, im_idx = _unique(images, id)
        uniq_tx, tx_idx = _unique(texts)
        a = self.embedder.embed_images(uniq_im, self.batch_size)[im_idx]
        b = self.embedder.embed_texts(uniq_tx, self.batch_size)[tx_idx]
        return (a * b).sum(-1)


class CycleI2TVerifier:
    """I2T cycle: similarity(image, G(caption)); the render of a caption is seeded from the caption and the model."""

    name = "cycle"

    def __init__(self, t2i, metric, gen_hash: str, batch_size: int = 8):
        self.t2i, self.metric, self.gen_hash, self.batch_size = t2i, metric, gen_hash, batch_size

    def render_seed(self, text: str) -> int:
        return seed_of(key_of(text.strip().lower(), self.gen_hash))

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        _check(images, texts)
        uniq_tx, tx_idx = _unique(texts, lambda t: t.strip().lower())
        renders = self.t2i.generate(uniq_tx, [self.render_seed(t) for t in uniq_tx], self.batch_size)
        uniq_im, im_idx = _unique(images, id)
        a = self.metric.embed(uniq_im, self.batch_size)[im_idx]
        b = self.metric.embed(renders, self.batch_size)[tx_idx]
        raw = self.metric.compare(a, b).double().numpy()
        return torch.from_numpy(oriented(raw, self.metric.direction)).float()


class CycleT2IVerifier:
    """T2I cycle: SBERT similarity(prompt, F(image)) with greedy back-captions."""

    name = "cycle"

    def __init__(self, captioner, metric, batch_size: int = 8):
        self.captioner, self.metric, self.batch_size = captioner, metric, batch_size

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        from cyclepref.models.captioner import clean_caption

        _check(images, texts)
        uniq_im, im_idx = _unique(images, id)
        back = [clean_caption(t) for t in self.captioner.caption(uniq_im, batch_size=self.batch_size)]
        uniq_tx, tx_idx = _unique(texts)
        a = self.metric.embed(uniq_tx, self.batch_size)[tx_idx]
        b = self.metric.embed(back, self.batch_size)[im_idx]
        return self.metric.compare(a, b).float()


@dataclass(frozen=True)
class VerifierSettings:
    """Where every verifier's models come from; the cycle models are the profile's own cycle settings."""

    root: Path
    device: str
    reward_model: str
    clip: str | None
    batch_size: int
    reconstruct_i2t: T2ISpec | None = None
    score_i2t: ImageMetricSpec | None = None
    reconstruct_t2i: CaptionerSpec | None = None
    score_t2i: TextMetricSpec | None = None

    @classmethod
    def from_params(cls, params: Params, section, root: Path, device: str) -> VerifierSettings:
        """`section`: a params section with reward_model, clip and batch_size (best_of_n, evaluate_downstream)."""
        return cls(
            Path(root),
            device,
            section.reward_model,
            section.clip,
            section.batch_size,
            params.reconstruct_i2t.model if params.reconstruct_i2t else None,
            params.score_i2t.metric if params.score_i2t else None,
            params.reconstruct_t2i.captioner if params.reconstruct_t2i else None,
            params.score_t2i.metric if params.score_t2i else None,
        )

    def local(self, spec):
        """A spec (or path) with a path relative to the project root made absolute."""
        if isinstance(spec, str):
            p = self.root / spec
            return str(p) if p.exists() else spec
        p = self.root / spec.path
        return spec.model_copy(update={"path": str(p)}) if p.exists() else spec


class Verifiers:
    """Loads each verifier once (per task for cycle) and hands out the same instance on every request."""

    def __init__(self, settings: VerifierSettings):
        self.settings = settings
        self._cache: dict[tuple[str, str], Verifier] = {}

    def get(self, kind: str, task: str) -> Verifier:
        key = (kind, task if kind == "cycle" else "")
        if key not in self._cache:
            self._cache[key] = self._load(kind, task)
        return self._cache[key]

    def for_task(self, kinds: Sequence[str], task: str) -> dict[str, Verifier]:
        return {k: self.get(k, task) for k in dict.fromkeys(kinds)}

    def _load(self, kind: str, task: str) -> Verifier:
        s = self.settings
        if kind == "reward":
            from cyclepref.reward.model import RewardModel

            return RewardVerifier(RewardModel.from_pretrained(s.local(s.reward_model)).to(s.device), s.batch_size)
        if kind == "clipscore":
            from cyclepref.models.similarity import ImageEmbedder

            if s.clip is None:
                raise ValueError("verifier clipscore needs an open_clip model (params: clip)")
            return ClipVerifier(ImageEmbedder(s.local(s.clip), s.device), s.batch_size)
        if kind == "cycle" and task == "i2t":
            return self._cycle_i2t()
        if kind == "cycle" and task == "t2i":
            return self._cycle_t2i()
        raise ValueError(f"unknown verifier {kind!r} for task {task!r}")

    def _cycle_i2t(self) -> CycleI2TVerifier:
        from cyclepref.cycle import Context, t2i_hash
        from cyclepref.models.similarity import ImageSimilarity
        from cyclepref.models.t2i import TextToImage

        s = self.settings
        if s.reconstruct_i2t is None or s.score_i2t is None:
            raise ValueError("verifier cycle (i2t) needs params sections reconstruct_i2t and score_i2t")
        gen_hash = t2i_hash(Context(s.root, s.device), s.reconstruct_i2t)
        t2i = TextToImage(s.local(s.reconstruct_i2t), s.device)
        return CycleI2TVerifier(t2i, ImageSimilarity(s.local(s.score_i2t), s.device), gen_hash, s.batch_size)

    def _cycle_t2i(self) -> CycleT2IVerifier:
        from cyclepref.models.captioner import make_captioner
        from cyclepref.models.similarity import TextSimilarity

        s = self.settings
        if s.reconstruct_t2i is None or s.score_t2i is None:
            raise ValueError("verifier cycle (t2i) needs params sections reconstruct_t2i and score_t2i")
        captioner = make_captioner(s.local(s.reconstruct_t2i), s.device)
        return CycleT2IVerifier(captioner, TextSimilarity(s.local(s.score_t2i), s.device), s.batch_size)
