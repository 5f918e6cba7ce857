"""limoe: LIMoE sparse multimodal mixture-of-experts models (open_clip-style interface)."""
from .checkpoint import ExportError, save
from .config import AuxLossWeights, LIMoEConfig, MoEConfig, get_config, list_models
from .factory import create_model, create_model_and_transforms, load
from .model import LIMoE
from .tokenizer import Tokenizer

__all__ = [
    "AuxLossWeights", "ExportError", "LIMoE", "LIMoEConfig", "MoEConfig", "Tokenizer", "create_model",
    "create_model_and_transforms", "get_config", "list_models", "load", "save",
]
