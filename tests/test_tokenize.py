"""imtune.data.tokenize: token starts computed from the bytes each id stands for equal the tokenizer's own offsets,
and every tokenizer or text where they would not is left to the offsets."""
from __future__ import annotations

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from imtune.data.tokenize import _batch_encode, _byte_lengths, _byte_starts, _tokens

TEXTS = ["Hi there  you\n\nok é 😀 done", "<|im_start|>user\nnaïve café — 中文字符 e\u0301 🇫🇷👨‍👩‍👧<|im_end|>\n",
         "", " leading and trailing spaces ", "\t\ttabs\r\nand CRLF", "<|im_end|><|im_end|>x"]


def _offset_starts(texts, tokenizer) -> np.ndarray:
    _, offsets = _batch_encode(texts, tokenizer)
    return np.array([o[0] for k in range(len(texts)) for o in offsets[k]], dtype=np.int64)


def test_starts_from_bytes_equal_the_offsets_of_the_default_tokenizer(tok):
    assert _byte_lengths(tok) is not None  # SmolLM2's byte-level BPE: the fast path is the one taken
    ids, starts, lengths = _tokens(TEXTS, tok)
    assert np.array_equal(starts, _offset_starts(TEXTS, tok))
    assert np.array_equal(_byte_starts(TEXTS, ids, lengths, tok), starts)
    assert lengths[2] == 0 and len(starts) == int(lengths.sum())


def _byte_level(normalizer=None, prefix_space=False, added=(), extra=()) -> PreTrainedTokenizerFast:
    """A small byte-level BPE (no merges: one token a byte) like SmolLM2's, with what would break byte starts."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet()) + list(extra)
    t = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space, use_regex=True)
    t.decoder = decoders.ByteLevel()
    t.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    if normalizer is not None:
        t.normalizer = normalizer
    t.add_special_tokens(list(added))
    return PreTrainedTokenizerFast(tokenizer_object=t)


@pytest.mark.parametrize("case", ["plain", "normalizer", "prefix space", "stripping added token", "wider vocabulary"])
def test_where_bytes_would_not_give_the_offsets_the_offsets_are_read(case):
    tok = _byte_level(normalizers.NFKC() if case == "normalizer" else None, case == "prefix space",
                      [AddedToken("<sep>", lstrip=True, special=True)] if case == "stripping added token" else [],
                      ["中"] if case == "wider vocabulary" else [])  # a character the byte alphabet lacks
    texts = ["a b <sep> ü 😀", "x"]
    ids, starts, lengths = _tokens(texts, tok)
    assert np.array_equal(starts, _offset_starts(texts, tok))  # whichever way they were found
    table = _byte_lengths(tok)
    if case == "plain":
        assert table is not None and _byte_starts(texts, ids, lengths, tok) is not None
    elif case == "stripping added token":  # eligible tokenizer, but " <sep>" is one token of 5 bytes for 6
        assert table is not None and _byte_starts(texts, ids, lengths, tok) is None
    else:
        assert table is None
