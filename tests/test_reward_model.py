"""RewardModel: freeze rule, head, batched scoring, the differentiable path, save/load, and the authors' keys."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image

from cyclepref.models import ModelLoadError
from cyclepref.reward.authors_keys import AuthorsCheckpointError, load_authors_checkpoint
from cyclepref.reward.data import PairCollator
from cyclepref.reward.model import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PAPER_HEAD,
    Regularisation,
    RewardHead,
    RewardModel,
    head_widths_for,
)
from cyclepref.reward.synthetic import colour_pairs
from cyclepref.reward.train import bradley_terry
from fixtures.authors_checkpoint import TINY, authors_state_dict


@pytest.fixture(scope="module")
def backbone(zoo) -> str:
    return str(zoo / "tiny-blip-itm")


@pytest.fixture
def model(backbone) -> RewardModel:
    return RewardModel.from_backbone(backbone, max_length=32, seed=0)


def paper_blip_config():
    from transformers import BlipConfig

    return BlipConfig(
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           patch_size=16, image_size=224),
        text_config=dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=512, encoder_hidden_size=1024),
        image_text_hidden_size=256,
    )


def test_paper_scale_freeze_rule_and_head():
    with torch.device("meta"):
        m = RewardModel(paper_blip_config(), None, 0.7, 128, processor=None)
    total = sum(p.numel() for p in m.parameters())
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert m.head_widths == list(PAPER_HEAD)
    assert [x.in_features for x in m.head.layers if isinstance(x, torch.nn.Linear)] == [768, 1024, 128, 64, 16]
    assert m.frozen_counts() == (8, 16)
    assert total == pytest.approx(447e6, rel=0.005)
    assert trainable == pytest.approx(140e6, rel=0.02)
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert "text_encoder.encoder.layer.7.output.dense.weight" in frozen
    assert "text_encoder.encoder.layer.8.attention.self.query.weight" not in frozen
    assert "vision_model.encoder.layers.15.mlp.fc2.bias" in frozen
    assert "vision_model.encoder.layers.16.self_attn.qkv.weight" not in frozen
    assert {"vision_proj.weight", "text_proj.weight", "text_encoder.embeddings.word_embeddings.weight",
            "vision_model.embeddings.patch_embedding.weight"} <= frozen


def test_head_widths_derive_from_the_text_width_unless_given(model):
    assert head_widths_for(768, None) == [1024, 128, 64, 16]
    assert model.head_widths == head_widths_for(32, None) == [43, 8, 8, 8]
    assert head_widths_for(32, [16, 4]) == [16, 4]
    for layer in model.head.layers:
        if isinstance(layer, torch.nn.Linear):
            assert torch.all(layer.bias == 0)
    with pytest.raises(ValueError, match="max_length 10000"):
        RewardModel(model.blip_config, None, 0.7, 10_000, model.processor)


def test_one_step_changes_every_trainable_parameter_and_no_frozen_one(model):
    pairs = colour_pairs("i2t", 8, seed=1)
    batch = PairCollator(model.processor, model.max_length)({"i2t": [pairs.example(i) for i in range(8)]})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    rewards = model(batch.pixel_values, batch.input_ids, batch.attention_mask, batch.image_index)
    loss, _ = bradley_terry(rewards, batch)["i2t"]
    loss.backward()
    opt.step()
    trainable = set(model.trainable_names())
    assert trainable and len(trainable) < len(before)
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == (name in trainable), name


def test_batched_scores_equal_one_at_a_time_and_each_image_is_encoded_once(model):
    red, blue = Image.new("RGB", (40, 28), (220, 30, 30)), Image.new("RGB", (20, 50), (30, 30, 220))
    images = [red, red, blue, red, blue]
    texts = ["a red square", "a blue square with a much longer caption than the others", "blue", "red", "a cat"]
    calls = []
    hook = model.vision_model.register_forward_hook(lambda mod, args, kwargs_out: calls.append(None))
    batched = model.score(images, texts, batch_size=8)
    hook.remove()
    single = torch.cat([model.score([im], [t]) for im, t in zip(images, texts, strict=True)])
    assert batched.shape == (5,)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        model.score([red, blue], ["x"])


def test_differentiable_path_gives_gradients_and_matches_score(model):
    img = Image.new("RGB", (32, 32), (40, 200, 90))
    pixels = torch.tensor(list(img.getdata()), dtype=torch.float32).view(32, 32, 3).permute(2, 0, 1)[None] / 255
    pixels.requires_grad_(True)
    r = model.reward(pixels, ["a green square"])
    r.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    torch.testing.assert_close(r.detach(), model.score([img], ["a green square"]), atol=1e-4, rtol=1e-4)
    big = torch.nn.functional.interpolate(pixels.detach(), size=(64, 64)).requires_grad_(True)
    model.reward(big, ["a green square"]).sum().backward()
    assert big.grad.abs().sum() > 0


def test_itm_head_init_scores_exactly_the_backbones_itm_logit_difference(backbone):
    from transformers import BlipForImageTextRetrieval

    images = [Image.new("RGB", (32, 32), c) for c in ((200, 30, 30), (30, 30, 200), (30, 200, 30))]
    texts = ["a red square", "a blue square on the left", "green"]
    m = RewardModel.from_backbone(backbone, max_length=32, seed=0, head_init="itm")
    blip = BlipForImageTextRetrieval.from_pretrained(backbone, dtype=torch.float32).eval()
    tok = m.tokenize(texts)
    with torch.no_grad():
        logits = blip(pixel_values=m.pixels(images), **tok, use_itm_head=True).itm_score
    itm = logits[:, 1] - logits[:, 0]
    assert itm.abs().max() > 1e-3  # a real signal, not a zero head
    torch.testing.assert_close(m.score(images, texts), itm, atol=1e-5, rtol=1e-5)
    # the paper's widths (1024 -> 128 -> 64 -> 16) carry it too, and the whole head stays trainable
    head = RewardHead(768, PAPER_HEAD)
    itm_head = torch.nn.Linear(768, 2)
    head.match_itm(itm_head)
    x = torch.randn(6, 768) * 3
    torch.testing.assert_close(head(x), (itm_head(x)[:, 1] - itm_head(x)[:, 0]).detach(), atol=1e-5, rtol=1e-5)
    torch.nn.functional.logsigmoid(head(x)[:3] - head(x)[3:]).mean().backward()
    assert all(m.weight.grad.abs().sum() > 0 for m in head.layers if isinstance(m, torch.nn.Linear))
    # random stays the default: the seeded Xavier head
    plain = RewardModel.from_backbone(backbone, max_length=32, seed=0)
    assert not torch.allclose(plain.score(images, texts), itm)
    with pytest.raises(ValueError, match="every hidden width >= 2"):
        RewardModel.from_backbone(backbone, head_widths=[8, 1], head_init="itm")
    with pytest.raises(ValueError, match="head_init must be one of"):
        RewardModel.from_backbone(backbone, head_init="zeros")


def test_save_and_load_round_trip(model, tmp_path):
    images = [Image.new("RGB", (32, 32), (200, 200, 30))] * 2
    texts = ["a yellow square", "a black square"]
    out = model.save_pretrained(tmp_path / "rm", metadata={"note": "x"})
    assert {"reward_config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    loaded = RewardModel.from_pretrained(out)
    assert loaded.metadata == {"note": "x"}
    assert loaded.head_widths == model.head_widths and loaded.fix_rate == model.fix_rate
    assert loaded.trainable_names() == model.trainable_names()
    torch.testing.assert_close(loaded.score(images, texts), model.score(images, texts), atol=0, rtol=0)
    with pytest.raises(ModelLoadError, match="not a cyclepref reward model"):
        RewardModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------- the authors' checkpoint layout


@pytest.fixture(scope="module")
def authors_sd():
    return authors_state_dict(**TINY)


def test_authors_checkpoint_loads_through_the_key_map(authors_sd, backbone, tmp_path):
    path = tmp_path / "CycleReward-Combo.pth"
    torch.save({"module." + k: v for k, v in authors_sd.items()}, path)
    m = load_authors_checkpoint(path, backbone)
    assert m.blip_config.vision_config.num_hidden_layers == 3
    assert m.blip_config.vision_config.image_size == 40
    assert m.head_widths == [24, 12, 6, 4]
    pairs = {
        "vision_model.embeddings.class_embedding": "blip.visual_encoder.cls_token",
        "vision_model.embeddings.position_embedding": "blip.visual_encoder.pos_embed",
        "vision_model.encoder.layers.2.self_attn.qkv.weight": "blip.visual_encoder.blocks.2.attn.qkv.weight",
        "vision_model.encoder.layers.1.self_attn.projection.bias": "blip.visual_encoder.blocks.1.attn.proj.bias",
        "vision_model.encoder.layers.0.layer_norm2.weight": "blip.visual_encoder.blocks.0.norm2.weight",
        "vision_model.post_layernorm.bias": "blip.visual_encoder.norm.bias",
        "text_encoder.encoder.layer.1.crossattention.self.key.weight":
            "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight",
        "vision_proj.weight": "blip.vision_proj.weight",
        "head.layers.8.weight": "mlp.layers.8.weight",
    }
    state = m.state_dict()
    for ours, theirs in pairs.items():
        assert torch.equal(state[ours], authors_sd[theirs]), ours
    score = m.score([Image.new("RGB", (50, 40), (10, 20, 30))], ["a dark photo"])
    assert score.shape == (1,) and torch.isfinite(score).all()


def test_authors_checkpoint_unknown_missing_and_misshapen_keys_fail_loudly(authors_sd, backbone, tmp_path):
    from safetensors.torch import save_file

    cases = {
        "unknown": ({**authors_sd, "blip.itm_head.weight": torch.zeros(2, 32)}, "unknown key.*blip.itm_head.weight"),
        "missing": ({k: v for k, v in authors_sd.items() if "layer.1.output.dense.bias" not in k},
                    "missing text_encoder.encoder.layer.1.output.dense.bias"),
        "shape": ({**authors_sd, "blip.text_proj.bias": torch.zeros(7)}, re.escape("text_proj.bias (7,) vs (16,)")),
    }
    for name, (sd, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        with pytest.raises(AuthorsCheckpointError, match=message):
            load_authors_checkpoint(path, backbone)


def test_image_size_resamples_position_embeddings_and_survives_save(backbone, tmp_path):
    m = RewardModel.from_backbone(backbone, max_length=16, image_size=48)
    assert m.vision_model.embeddings.position_embedding.shape == (1, 37, 32)
    ip = m.processor.image_processor
    assert (ip.size["shortest_edge"], ip.crop_size["height"], ip.crop_size["width"]) == (48, 48, 48)
    img = Image.new("RGB", (64, 40), (90, 10, 200))
    score = m.score([img], ["a purple square"])
    loaded = RewardModel.from_pretrained(m.save_pretrained(tmp_path / "rm48"))
    assert loaded.blip_config.vision_config.image_size == 48
    torch.testing.assert_close(loaded.score([img], ["a purple square"]), score, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        RewardModel.from_backbone(backbone, image_size=50)


def test_import_checkpoint_registers_the_authors_model_and_it_scores_from_the_registry(
    authors_sd, backbone, mlflow_uri, tmp_path
):
    import mlflow
    from typer.testing import CliRunner

    from cyclepref.cli import app
    from cyclepref.reward.pyfunc import load_reward_model

    path = tmp_path / "CycleReward-Combo.pth"
    torch.save(authors_sd, path)
    out = CliRunner().invoke(app, ["import-checkpoint", str(path), "--backbone", backbone, "--name", "cr-authors",
                                   "--root", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "cr-authors version 1 registered from CycleReward-Combo.pth" in out.output
    version = mlflow.MlflowClient().get_model_version("cr-authors", "1")
    assert version.tags["cyclepref.checkpoint"] == "CycleReward-Combo.pth"
    assert (tmp_path / "data" / "reward" / "authors" / "CycleReward-Combo" / "reward_config.json").exists()

    served = load_reward_model("models:/cr-authors/1")
    direct = load_authors_checkpoint(path, backbone)
    assert torch.equal(served.state_dict()["head.layers.8.weight"], authors_sd["mlp.layers.8.weight"])
    images = [Image.new("RGB", (50, 40), (200, 30, 30)), Image.new("RGB", (50, 40), (30, 30, 200))]
    pair = served.score(images, ["a red square"] * 2)
    assert torch.allclose(pair, direct.score(images, ["a red square"] * 2), atol=1e-5)
    assert pair[0] != pair[1]

    bad = CliRunner().invoke(app, ["import-checkpoint", str(tmp_path / "missing.pth"), "--backbone", backbone,
                                   "--root", str(tmp_path)])
    assert bad.exit_code == 2 and "checkpoint not found" in bad.output


# ---------------------------------------------------------------- preprocessing and regularisation


def noise(width: int, height: int, seed: int) -> Image.Image:
    import numpy as np

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_images_are_resized_on_the_shorter_side_and_centre_cropped_like_the_authors(backbone, tmp_path):
    """Reference: the authors' transform (CycleReward dataset/dataset.py `_transform`) in torchvision on the PIL image,
    equal to float precision. The differentiable path resizes float tensors with torch (bicubic a=-0.75, where PIL
    uses a=-0.5), so its reference is the same torchvision transform on tensors. Odd margins (99x61 -> 51x32) check
    the rounding of the crop offset; on noise images a one-pixel offset or a squash is far outside the tolerance."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
    from torchvision.transforms import functional as TF

    m = RewardModel.from_backbone(backbone, max_length=16, image_size=32)
    reference = Compose([Resize(32, interpolation=InterpolationMode.BICUBIC), CenterCrop(32), ToTensor(),
                         Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])
    loaded = RewardModel.from_pretrained(m.save_pretrained(tmp_path / "rm"))
    for k, (w, h) in enumerate([(99, 61), (61, 99), (45, 90), (300, 200), (32, 32)]):
        img = noise(w, h, seed=k)
        want = reference(img)
        got = m.pixels([img])[0]
        assert got.shape == want.shape == (3, 32, 32)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        torch.testing.assert_close(loaded.pixels([img])[0], got, atol=0, rtol=0)
        tensor = TF.to_tensor(img)[None]
        on_tensors = TF.normalize(TF.center_crop(TF.resize(tensor, 32, InterpolationMode.BICUBIC, antialias=True), 32),
                                  OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        torch.testing.assert_close(m.preprocess_tensor(tensor), on_tensors, atol=1e-5, rtol=0)
    squashed = Compose([Resize((32, 32), interpolation=InterpolationMode.BICUBIC), ToTensor(),
                        Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])(noise(99, 61, seed=0))
    assert (m.pixels([noise(99, 61, seed=0)])[0] - squashed).abs().max() > 0.5


def _two_train_passes(m: RewardModel, batch) -> tuple[torch.Tensor, torch.Tensor]:
    m.train()
    with torch.no_grad():
        return tuple(m(batch.pixel_values, batch.input_ids, batch.attention_mask, batch.image_index) for _ in range(2))


def test_dropout_and_drop_path_act_in_training_only_and_leave_eval_scores_unchanged(backbone, tmp_path):
    pairs = colour_pairs("i2t", 6, seed=3)
    examples = [pairs.example(i) for i in range(6)]
    authors = Regularisation(text_dropout=0.1, text_attention_dropout=0.1, drop_path_rate=0.1)
    plain = RewardModel.from_backbone(backbone, max_length=16, seed=0)
    reg = RewardModel.from_backbone(backbone, max_length=16, seed=0, regularisation=authors)
    assert reg.blip_config.text_config.hidden_dropout_prob == 0.1
    assert reg.blip_config.text_config.attention_probs_dropout_prob == 0.1
    batch = PairCollator(reg.processor, reg.max_length)({"i2t": examples})

    a, b = _two_train_passes(plain, batch)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    a, b = _two_train_passes(reg, batch)
    assert not torch.equal(a, b)
    only_drop_path = RewardModel.from_backbone(backbone, max_length=16, regularisation=Regularisation(
        drop_path_rate=0.5))
    a, b = _two_train_passes(only_drop_path, batch)
    assert not torch.equal(a, b)

    images = [e.image for e in examples]
    texts = [e.chosen for e in examples]
    plain.eval()
    reg.eval()
    torch.testing.assert_close(reg.score(images, texts), plain.score(images, texts), atol=0, rtol=0)
    loaded = RewardModel.from_pretrained(reg.save_pretrained(tmp_path / "reg"))
    assert loaded.drop_path_rate == 0.1 and loaded.blip_config.text_config.hidden_dropout_prob == 0.1
    a, b = _two_train_passes(loaded, batch)
    assert not torch.equal(a, b)
    loaded.eval()
    torch.testing.assert_close(loaded.score(images, texts), plain.score(images, texts), atol=0, rtol=0)


def test_a_saved_model_does_not_record_how_it_was_loaded(model, tmp_path):
    """transformers writes `local_files_only` (HF_HUB_OFFLINE, set for tests) into a saved tokenizer config; a saved
    reward model must not depend on that environment setting."""
    import json

    saved = model.save_pretrained(tmp_path / "rm")
    configs = {p.name: json.loads(p.read_text()) for p in saved.glob("*_config.json")}
    assert "tokenizer_config.json" in configs
    assert not [name for name, cfg in configs.items() if "local_files_only" in cfg]
    loaded = RewardModel.from_pretrained(saved)
    image = Image.new("RGB", (32, 32), "red")
    torch.testing.assert_close(loaded.score([image], ["a red square"]), model.score([image], ["a red square"]))


def test_authors_key_set_from_their_module_definitions_loads_and_only_benign_differences_pass(backbone, tmp_path):
    """A state dict with exactly the key set of the authors' modules (tests/fixtures/authors_modules.py): it loads;
    the persistent text position_ids buffer may be absent (a save without it) or present; any other missing or
    unexpected key is refused with every such key named (the authors' own load_state_dict(strict=False) would drop
    them silently)."""
    from fixtures.authors_modules import CycleReward

    torch.manual_seed(0)
    authors = CycleReward(**TINY).state_dict()
    assert set(authors) == set(authors_state_dict(**TINY)), "the fixture's key set is the authors' key set"
    assert "blip.text_encoder.embeddings.position_ids" in authors
    for name, sd in {"full": authors,
                     "no_position_ids": {k: v for k, v in authors.items() if not k.endswith("position_ids")}}.items():
        torch.save(sd, tmp_path / f"{name}.pth")
        m = load_authors_checkpoint(tmp_path / f"{name}.pth", backbone)
        assert torch.equal(m.state_dict()["head.layers.8.bias"], authors["mlp.layers.8.bias"])
    dropped = sorted(k for k in authors if ".encoder.layer.1.crossattention." in k)
    extra = {f"blip.itm_head.{i}.weight": torch.zeros(1) for i in range(10)}
    cases = {"missing": ({k: v for k, v in authors.items() if k not in dropped}, [
        k.replace("blip.text_encoder.", "text_encoder.") for k in dropped]), "unexpected": ({**authors, **extra}, extra)}
    for name, (sd, keys) in cases.items():
        torch.save(sd, tmp_path / f"{name}.pth")
        with pytest.raises(AuthorsCheckpointError) as err:
            load_authors_checkpoint(tmp_path / f"{name}.pth", backbone)
        assert len(keys) > 8 and all(k in str(err.value) for k in keys), str(err.value)
