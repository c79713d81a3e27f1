"""upperson: parameter-efficient text-based person retrieval on a frozen CLIP backbone."""

from upperson import losses, petl, retrieval
from upperson.adapter_file import AdapterMismatchError, load_adapter, save_adapter
from upperson.backbone import BackboneLoadError, load_backbone
from upperson.methods import METHODS, CSKTConfig, MethodEntry, RetrievalModel, UPPersonConfig, create_model, register_method
from upperson.methods.official import import_official_state_dict, official_method, read_official_config
from upperson.methods.up_person import official_config_from_state_dict
from upperson.tokenizer import MASK_TOKEN_ID, tokenize
from upperson.version import __version__

__all__ = [
    "AdapterMismatchError",
    "BackboneLoadError",
    "CSKTConfig",
    "MASK_TOKEN_ID",
    "METHODS",
    "MethodEntry",
    "RetrievalModel",
    "UPPersonConfig",
    "__version__",
    "create_model",
    "import_official_state_dict",
    "load_adapter",
    "load_backbone",
    "losses",
    "official_config_from_state_dict",
    "official_method",
    "petl",
    "read_official_config",
    "register_method",
    "save_adapter",
    "retrieval",
    "tokenize",
]
