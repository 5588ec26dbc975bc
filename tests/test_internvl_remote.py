"""InternVL2 through a stand-in of its remote code that keeps the real files' structure where it matters
(tests/fixtures/internvl_remote: an InternLM2 causal LM without GenerationMixin and with the legacy tuple cache,
`batch_chat` with `.cuda()`, conversation.py templates; InternVL2-40B's Llama LM with the Hermes-2 template)."""

import pytest
import torch
from fixtures import tiny_families as tf
from PIL import Image

from cyclepref.config import CaptionerSpec
from cyclepref.models import captioner as cap_mod

IMAGES = [Image.new("RGB", (96, 40), (200, 30, 30)), Image.new("RGB", (56, 56), (20, 30, 230))]


@pytest.fixture(scope="module")
def captioners(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("internvl"), {}

    def get(llm: str):
        if llm not in made:
            tf.build_internvl(root / llm, llm=llm)
            spec = CaptionerSpec(name=llm, path=str(root / llm), family="internvl", max_new_tokens=6,
                                 trust_remote_code=True)
            made[llm] = cap_mod.make_captioner(spec)
        return made[llm]

    return get


def _inputs(cap):
    tiles = [cap.pixels(im) for im in IMAGES]
    cap.tokenizer.padding_side = "left"
    enc = cap.tokenizer([cap.query(len(t)) for t in tiles], return_tensors="pt", padding=True)
    return torch.cat(tiles), enc["input_ids"], enc["attention_mask"]


def test_remote_internlm2_lm_cannot_generate_and_batch_chat_needs_cuda(captioners):
    from transformers import GenerationMixin

    cap = captioners("InternLM2ForCausalLM")
    lm = cap.model.language_model
    assert type(lm).__name__ == "InternLM2ForCausalLM" and not isinstance(lm, GenerationMixin)
    assert not hasattr(type(lm), "generate"), "transformers >= 4.50: PreTrainedModel brings no generate"
    assert "generate" in vars(lm), "the loader gave the LM a generate"
    if not torch.cuda.is_available():
        with pytest.raises((AssertionError, RuntimeError)):
            cap.model.batch_chat(cap.tokenizer, _inputs(cap)[0], ["<image>\nhi"] * 2, {"max_new_tokens": 2},
                                 num_patches_list=[len(cap.pixels(im)) for im in IMAGES])


def test_cached_decode_equals_a_full_recompute_without_cache(captioners):
    """Greedy decoding with the remote LM's tuple cache = recomputing the whole left-padded sequence every step."""
    cap = captioners("InternLM2ForCausalLM")
    lm = cap.model.language_model
    pixels, ids, mask = _inputs(cap)
    with torch.no_grad():
        embeds = lm.get_input_embeddings()(ids)
        embeds[ids == cap.model.img_context_token_id] = cap.model.extract_feature(pixels).reshape(-1, embeds.shape[-1])
        got = cap_mod.cached_decode(lm, embeds, mask, max_new_tokens=6)
        seq, m, want = embeds, mask, []
        for _ in range(6):
            pos = (m.cumsum(-1) - 1).masked_fill(m == 0, 1)
            token = lm(inputs_embeds=seq, attention_mask=m, position_ids=pos).logits[:, -1].argmax(-1)
            want.append(token)
            seq = torch.cat([seq, lm.get_input_embeddings()(token[:, None])], dim=1)
            m = torch.cat([m, m.new_ones(len(m), 1)], dim=1)
    assert mask[:, 0].float().mean() < 1, "the batch is left-padded"
    assert torch.equal(got, torch.stack(want, dim=1))


def test_generation_mixin_alone_does_not_decode_the_remote_lm_here(captioners):
    """The usual fix (GenerationMixin added to the LM class) leaves the remote prepare_inputs_for_generation, which
    speaks the legacy `past_key_values`; transformers 5's generate passes `cache`, so decoding breaks. That is why the
    loader decodes over the LM's forward itself (cached_decode)."""
    from transformers import GenerationConfig, GenerationMixin

    cap = captioners("InternLM2ForCausalLM")
    lm = cap.model.language_model
    cls = type(lm)
    patched = type(cls.__name__, (cls, GenerationMixin), {})
    pixels, ids, mask = _inputs(cap)
    own = vars(lm).pop("generate")
    try:
        lm.__class__ = patched
        lm.generation_config = GenerationConfig.from_model_config(lm.config)
        with pytest.raises(RuntimeError):
            cap.model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, max_new_tokens=4)
    finally:
        lm.__class__, lm.generate = cls, own


def test_internvl2_40b_llama_lm_with_hermes_template(captioners):
    cap = captioners("LlamaForCausalLM")
    assert type(cap.model.language_model).__name__ == "LlamaForCausalLM"
    assert "generate" not in vars(cap.model.language_model), "a transformers LM keeps its own generate"
    assert cap.template.name == "Hermes-2"
    query = cap.query(2)
    assert query.startswith("<|im_start|>system\n") and query.endswith("<|im_end|><|im_start|>assistant\n")
    assert query.count("<IMG_CONTEXT>") == 2 * cap.model.num_image_token
    captions = cap.caption(IMAGES, batch_size=2)
    assert captions == [cap.caption([im], batch_size=1)[0] for im in IMAGES]


def test_sampling_is_seeded_and_filters_like_transformers(captioners):
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]] * 2000)
    assert set(cap_mod.next_token(logits, {"top_k": 1}).tolist()) == {0}
    probs = logits[0].softmax(-1)
    assert probs[0] < 0.9 < probs[:2].sum()
    assert set(cap_mod.next_token(logits, {"top_p": 0.9}).tolist()) == {0, 1}
    assert set(cap_mod.next_token(logits, {"temperature": 1.0}).tolist()) == {0, 1, 2, 3}
    cap = captioners("InternLM2ForCausalLM")
    sample = {"temperature": 1.5, "top_p": 0.95}
    first = cap.caption(IMAGES, batch_size=2, sample=sample, seeds=[3, 4])
    assert first == cap.caption(IMAGES[::-1], batch_size=1, sample=sample, seeds=[4, 3])[::-1]
    with pytest.raises(ValueError, match="unsupported generation arguments"):
        cap_mod.cached_decode(cap.model.language_model, torch.zeros(1, 2, 64), torch.ones(1, 2), 1, num_beams=2)
