"""Tokenizer ids as the official code produces them."""

from __future__ import annotations

import upperson
from upperson.tokenizer import EOT_TOKEN_ID, MASK_TOKEN_ID, SOT_TOKEN_ID, get_tokenizer


def test_known_ids() -> None:
    ids = upperson.tokenize("a photo of a person or a pedestrian")[0]
    assert ids[:10].tolist() == [SOT_TOKEN_ID, 320, 1125, 539, 320, 2533, 541, 320, 18256, EOT_TOKEN_ID]
    assert ids[10:].eq(0).all() and ids.shape == (77,)


def test_overlong_caption_keeps_77_tokens_with_eot_last() -> None:
    ids = upperson.tokenize(" ".join(["red"] * 120))[0]
    assert ids.shape == (77,) and ids[-1] == EOT_TOKEN_ID and ids.argmax() == 76


def test_unicode_and_punctuation_pass_through() -> None:
    ids = upperson.tokenize(["Café — “quoted”, naïve & <b>bold</b>!"])[0]
    assert ids[0] == SOT_TOKEN_ID and (ids == EOT_TOKEN_ID).sum() == 1 and ids.max() == EOT_TOKEN_ID


def test_mask_token_is_free_like_the_official_vocabulary() -> None:
    tokenizer = get_tokenizer()
    assert tokenizer.decoder[MASK_TOKEN_ID] == "<|mask|>"
    ids = upperson.tokenize("jekyll")[0]
    assert MASK_TOKEN_ID not in ids.tolist()
