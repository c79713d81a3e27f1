"""UP-Person (the main method): S-Prefix + K/V LoRA + L-Adapter in every block of both CLIP encoders."""

from upperson.methods.registry import MethodEntry, register_method
from upperson.methods.up_person.config import INIT_ONLY_FIELDS, AdapterPlacement, UPPersonConfig, describe_up_person
from upperson.methods.up_person.inject import adapter_sites, inject_up_person
from upperson.methods.up_person.official import OFFICIAL_FORMAT, official_config_from_state_dict, official_to_upperson_key

ENTRY = register_method(
    MethodEntry(
        name="up-person",
        config_class=UPPersonConfig,
        inject=inject_up_person,
        summary="S-Prefix + LoRA on K/V + L-Adapter in every block of both encoders (UP-Person)",
        init_only_fields=INIT_ONLY_FIELDS,
        official=OFFICIAL_FORMAT,
        parameter_columns=("prefix", "lora", "adapter"),
        describe=describe_up_person,
    )
)

__all__ = [
    "ENTRY",
    "AdapterPlacement",
    "UPPersonConfig",
    "adapter_sites",
    "describe_up_person",
    "inject_up_person",
    "official_config_from_state_dict",
    "official_to_upperson_key",
]
