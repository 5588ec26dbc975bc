"""Cycle similarity metrics: image-image (I2T cycle) and text-text (T2I cycle), batched, with their direction."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from cyclepref.config import ImageMetricSpec, TextMetricSpec
from cyclepref.models import ModelLoadError, load_failed, locate
from cyclepref.scoring import DIRECTIONS, Direction


def open_clip_ident(path: str, revision: str | None = None) -> str:
    """The open_clip model id of a directory or an `hf-hub:<org/name>[@<commit>]` id. A pinned hub model is read
    from the Hugging Face cache at that commit (open_clip's own hf-hub loader has no revision)."""
    if path.startswith("local-dir:"):
        return path
    if not path.startswith("hf-hub:"):
        return f"local-dir:{locate(path)}"
    repo, _, pinned = path[len("hf-hub:") :].partition("@")
    if not (pinned or revision):
        return path
    from huggingface_hub import snapshot_download

    return f"local-dir:{snapshot_download(repo, revision=pinned or revision)}"


class ImageEmbedder:
    """open_clip image (and text) embeddings, L2-normalised. Loads directories or `hf-hub:` ids (pinned with
    `@<commit>` or `revision`)."""

    def __init__(self, path: str, device: str = "cpu", revision: str | None = None):
        import open_clip

        try:
            ident = open_clip_ident(path, revision)
            model, _, preprocess = open_clip.create_model_and_transforms(ident, device=device)
            self.tokenizer = open_clip.get_tokenizer(ident)
        except Exception as err:
            raise load_failed(path, err) from err
        self.model, self.preprocess, self.device = model.eval(), preprocess, device

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        feats = []
        for start in range(0, len(images), batch_size):
            x = torch.stack([self.preprocess(im.convert("RGB")) for im in images[start : start + batch_size]])
            feats.append(torch.nn.functional.normalize(self.model.encode_image(x.to(self.device)).float(), dim=-1))
        return torch.cat(feats).cpu() if feats else torch.empty(0)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        feats = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
            feats.append(torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1))
        return torch.cat(feats).cpu() if feats else torch.empty(0)


class ImageSimilarity:
    """similarity(original, reconstruction) per pair; `direction` says whether higher or lower is better."""

    def __init__(self, spec: ImageMetricSpec, device: str = "cpu"):
        self.kind, self.device = spec.kind, device
        self.direction: Direction = DIRECTIONS[spec.kind]
        if spec.kind == "open_clip":
            self._clip = ImageEmbedder(spec.path, device, spec.revision)
        elif spec.kind == "dreamsim":
            try:
                from dreamsim import dreamsim
            except ImportError as err:
                raise ModelLoadError("metric dreamsim needs `pip install cyclepref[dreamsim]`") from err
            try:
                self._model, self._pre = dreamsim(pretrained=True, cache_dir=locate(spec.path), device=device)
            except Exception as err:
                raise load_failed(spec.path, err) from err
        else:
            try:
                import lpips
            except ImportError as err:
                raise ModelLoadError("metric lpips needs `pip install lpips`") from err
            self._model = lpips.LPIPS(net=spec.path, verbose=False).to(device).eval()

    def embed(self, images: Sequence[Image.Image], batch_size: int = 32):
        """Per-image representation, computed once per image (originals are embedded once per stage)."""
        if self.kind == "open_clip":
            return self._clip.embed_images(images, batch_size)
        if self.kind == "dreamsim":
            with torch.inference_mode():
                return torch.cat([self._model.embed(self._pre(im.convert("RGB")).to(self.device)) for im in images]).cpu()
        import torchvision.transforms.functional as tf

        return torch.stack([tf.to_tensor(im.convert("RGB").resize((64, 64))) * 2 - 1 for im in images])

    @torch.inference_mode()
    def compare(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Raw metric between two aligned batches of representations from `embed`."""
        if self.kind == "open_clip":
            return (a * b).sum(-1)
        if self.kind == "dreamsim":
            return 1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)
        return self._model(a.to(self.device), b.to(self.device)).flatten().cpu()


class TextSimilarity:
    """SBERT cosine similarity (higher is better)."""

    direction: Direction = "higher"

    def __init__(self, spec: TextMetricSpec, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        try:
            self.model = SentenceTransformer(locate(spec.path), device=device, revision=spec.revision)
        except Exception as err:
            raise load_failed(spec.path, err) from err

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        return self.model.encode(
            list(texts), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
            show_progress_bar=False,
        ).cpu()

    @staticmethod
    def compare(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * b).sum(-1)
