"""zeros-lm: language models built on ZeroS (zero-sum linear attention)."""

__version__ = "0.1.0"

from ._torch_floor import check_torch_version

check_torch_version()  # before transformers, which would fail later and less clearly

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_zeros import ZeroSCache
from .configuration_zeros import ZeroSConfig
from .modeling_zeros import ZeroSForCausalLM, ZeroSModel, ZeroSPreTrainedModel

# Importing zeros_lm makes model_type "zeros" known to the Auto classes ...
AutoConfig.register(ZeroSConfig.model_type, ZeroSConfig, exist_ok=True)
AutoModel.register(ZeroSConfig, ZeroSModel, exist_ok=True)
AutoModelForCausalLM.register(ZeroSConfig, ZeroSForCausalLM, exist_ok=True)
# ... and save_pretrained writes `auto_map` and copies the modeling code into the directory, so that
# it also loads where zeros_lm is not installed, with trust_remote_code=True.
ZeroSConfig.register_for_auto_class()
ZeroSModel.register_for_auto_class("AutoModel")
ZeroSForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "ZeroSCache",
    "ZeroSConfig",
    "ZeroSForCausalLM",
    "ZeroSModel",
    "ZeroSPreTrainedModel",
    "__version__",
]
