"""CLIP BPE tokenisation with the official TPR code's ``<|mask|>`` token at id 49405."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from open_clip.tokenizer import SimpleTokenizer, default_bpe

MASK_TOKEN = "<|mask|>"
MASK_TOKEN_ID = 49405
"""Id used by text-masking augmentation; the official code frees it by dropping CLIP's last BPE merge."""
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
CONTEXT_LENGTH = 77


@lru_cache(maxsize=1)
def get_tokenizer() -> SimpleTokenizer:
    """open_clip's CLIP tokenizer with its last BPE merge removed, so that id 49405 is ``<|mask|>``.

    This matches the official vocabulary exactly: ordinary text gets the same ids as open_clip's
    tokenizer except words that used the dropped merge ("jekyll"), which now split like the official
    tokenizer splits them.
    """
    tokenizer = SimpleTokenizer()
    last_merge = max(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.__getitem__)
    merged = "".join(last_merge)
    if tokenizer.encoder.get(merged) != MASK_TOKEN_ID:
        raise RuntimeError(f"unexpected CLIP vocabulary: last merge {merged!r} is not id {MASK_TOKEN_ID}")
    del tokenizer.bpe_ranks[last_merge]
    del tokenizer.encoder[merged]
    tokenizer.decoder[MASK_TOKEN_ID] = MASK_TOKEN
    tokenizer.cache = {token: token for token in tokenizer.cache if token in tokenizer.encoder}
    return tokenizer


def tokenize(texts: str | list[str], context_length: int = CONTEXT_LENGTH) -> torch.LongTensor:
    """Captions → ``[N, context_length]`` ids: ``[SOT] + BPE + [EOT]``, zero-padded.

    Text is cleaned like CLIP (ftfy, HTML unescape, whitespace collapse, lower case). Captions that
    are too long keep their first ``context_length`` tokens with the last one forced to EOT.
    """
    if isinstance(texts, str):
        texts = [texts]
    return get_tokenizer()(texts, context_length=context_length)


def dropped_tokens(texts: list[str], context_length: int = CONTEXT_LENGTH) -> list[int]:
    """How many BPE tokens `tokenize` cuts off the end of each text (0 where it fits)."""
    tokenizer = get_tokenizer()
    return [max(0, len(tokenizer.encode(text)) + 2 - context_length) for text in texts]  # + SOT and EOT


def tokenizer_settings(context_length: int = CONTEXT_LENGTH) -> dict[str, Any]:
    """What a tokenizer outside Python must do to give `tokenize`'s ids (written into exports)."""
    tokenizer = get_tokenizer()
    return {
        "type": "clip-bpe",
        "bpe_vocabulary": Path(default_bpe()).name,
        "bpe_vocabulary_source": "open_clip (OpenAI CLIP's byte-level BPE)",
        "bpe_merges": f"every merge of the file except the last, whose id {MASK_TOKEN_ID} is {MASK_TOKEN} instead",
        "vocab_size": len(tokenizer.decoder),
        "mask_token_id": MASK_TOKEN_ID,
        "sot_token_id": SOT_TOKEN_ID,
        "eot_token_id": EOT_TOKEN_ID,
        "pad_token_id": 0,
        "context_length": context_length,
        "cleaning": ["ftfy.fix_text", "html.unescape twice", "collapse whitespace runs to one space", "strip", "lower-case"],
        "pretokenize_regex": tokenizer.pat.pattern,
        "pretokenize_regex_flags": "IGNORECASE (Python's `regex` module: \\p{L} / \\p{N} are Unicode classes)",
        "layout": "[SOT] + BPE ids + [EOT], right-padded with pad_token_id to context_length",
        "truncation": "keep the first context_length ids and overwrite the last one with EOT",
    }
