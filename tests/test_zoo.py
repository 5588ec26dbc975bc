"""Every zoo model round-trips save -> load offline through the adapters that load hub ids."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cyclepref.config import CaptionerSpec, ImageMetricSpec, T2ISpec, TextMetricSpec
from cyclepref.models import ModelLoadError, zoo as z

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images():
    return [Image.open(p).convert("RGB") for p in sorted((ROOT / "data/inputs/images").glob("*.jpg"))[:3]]


def test_offline_mode_is_on():
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("family,dirname", [("llava", "tiny-llava"), ("blip", "tiny-blip")])
def test_captioners_load_and_caption(zoo, images, family, dirname):
    from cyclepref.models.captioner import Captioner

    cap = Captioner(CaptionerSpec(name=family, path=str(zoo / dirname), family=family, max_new_tokens=8))
    out = cap.caption(images, batch_size=3)
    assert len(out) == 3 and all(isinstance(t, str) for t in out)
    ids = cap.tokenizer(out[0], add_special_tokens=False)["input_ids"]
    assert 0 < len(ids) <= 8 + 2


def test_llava_processor_expands_image_tokens(zoo, images):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(zoo / "tiny-llava")
    model = LlavaForConditionalGeneration.from_pretrained(zoo / "tiny-llava")
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], add_generation_prompt=True
    )
    assert text.startswith("USER: <image>\nhi") and text.endswith("ASSISTANT:")
    batch = proc(images=images[:2], text=[text] * 2, return_tensors="pt")
    n_image_tokens = (batch["input_ids"] == model.config.image_token_id).sum(1)
    assert n_image_tokens.tolist() == [16, 16]
    logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], model.config.text_config.vocab_size)


@pytest.mark.parametrize("family,dirname", [("sd", "tiny-sd"), ("sd3", "tiny-sd3")])
def test_text_to_image_pipelines_load_and_generate(zoo, family, dirname):
    from cyclepref.models.t2i import TextToImage

    spec = T2ISpec(name=family, path=str(zoo / dirname), family=family, steps=2, guidance=7.5, height=32, width=32)
    out = TextToImage(spec).generate(["a cat", "a dog"], [1, 2], batch_size=2)
    assert [im.size for im in out] == [(32, 32), (32, 32)]
    assert all(im.mode == "RGB" for im in out)
    assert np.asarray(out[0]).std() > 0


def test_blip_itm_backbone_loads(zoo, images):
    from transformers import AutoProcessor, BlipForImageTextRetrieval

    proc = AutoProcessor.from_pretrained(zoo / "tiny-blip-itm")
    model = BlipForImageTextRetrieval.from_pretrained(zoo / "tiny-blip-itm").eval()
    batch = proc(images=images[:2], text=["a cat", "a long caption of a dog"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch)
    assert out.itm_score.shape == (2, 2)
    assert model.text_encoder.encoder.layer[0].crossattention is not None


def test_open_clip_loads_from_local_dir(zoo, images):
    from cyclepref.models.similarity import ImageEmbedder, ImageSimilarity

    emb = ImageEmbedder(str(zoo / "tiny-open-clip"))
    e = emb.embed_images(images)
    t = emb.embed_texts(["a cat", "a dog"])
    assert e.shape == (3, 32) and t.shape == (2, 32)
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    sim = ImageSimilarity(ImageMetricSpec(kind="open_clip", path=str(zoo / "tiny-open-clip")))
    s = sim.compare(sim.embed(images), sim.embed(images))
    assert torch.allclose(s, torch.ones(3), atol=1e-5)


def test_sbert_is_the_real_minilm(zoo):
    from cyclepref.models.similarity import TextSimilarity

    sim = TextSimilarity(TextMetricSpec(path=str(zoo / "all-MiniLM-L6-v2")))
    a = sim.embed(["a cat sitting on a mat", "a cat sitting on a mat"])
    b = sim.embed(["a kitten resting on a rug", "a red sports car on a highway"])
    assert a.shape == (2, 384)
    s = sim.compare(a, b)
    assert s[0] > 0.5 > s[1]


def test_clip_tokenizer_matches_open_clip_ids():
    import open_clip

    from cyclepref.models.tokenizers import build_clip_tokenizer

    ours, theirs = build_clip_tokenizer(), open_clip.get_tokenizer("ViT-B-32")
    for text in ["a photo of a cat", "Hello, World! naïve café 123", "an orange space-suit, (1990s)"]:
        a = ours(text)["input_ids"]
        b = [i for i in theirs([text])[0].tolist() if i != 0]
        assert a == b


def test_zoo_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    a = z.build("blip_itm", tmp_path / "a", seed=3, image_size=32)
    b = z.build("blip_itm", tmp_path / "b", seed=3, image_size=32)
    c = z.build("blip_itm", tmp_path / "c", seed=4, image_size=32)
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_missing_model_fails_with_path_and_hint(tmp_path):
    from cyclepref.models.captioner import Captioner

    with pytest.raises(ModelLoadError, match="no such local model directory.*bootstrap_models"):
        Captioner(CaptionerSpec(name="x", path=str(tmp_path / "absent"), family="llava"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=f"could not load model from {tmp_path / 'empty'}"):
        Captioner(CaptionerSpec(name="x", path=str(tmp_path / "empty"), family="llava"))
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=1"):
        Captioner(CaptionerSpec(name="x", path="nobody/no-such-model", family="llava"))
