"""CSKT (the predecessor baseline): bidirectional deep prompts with coupling layers and dual adapters."""

from upperson.losses import LOSS_NAMES
from upperson.methods.cskt.config import INIT_ONLY_FIELDS, CSKTConfig, PromptInit
from upperson.methods.cskt.inject import encode_image, encode_text, inject_cskt, prompt_sets, shift_captions
from upperson.methods.cskt.official import OFFICIAL_FORMAT, cskt_config_from_state_dict, cskt_official_to_upperson_key
from upperson.methods.registry import MethodEntry, register_method

ENTRY = register_method(
    MethodEntry(
        name="cskt",
        config_class=CSKTConfig,
        inject=inject_cskt,
        summary="bidirectional prompts with text<->image coupling + dual adapters beside the MLP (CSKT)",
        init_only_fields=INIT_ONLY_FIELDS,
        losses=frozenset(LOSS_NAMES) - {"mlm"},
        official=OFFICIAL_FORMAT,
        encode_image=encode_image,
        encode_text=encode_text,
    )
)
"""CSKT inserts prompt tokens, so it has its own encoders and no token-level features: no MLM (the
official CSKT MLM path is broken, spec A.13)."""

__all__ = [
    "ENTRY",
    "CSKTConfig",
    "PromptInit",
    "cskt_config_from_state_dict",
    "cskt_official_to_upperson_key",
    "encode_image",
    "encode_text",
    "inject_cskt",
    "prompt_sets",
    "shift_captions",
]
