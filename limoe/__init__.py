"""limoe: LIMoE sparse multimodal mixture-of-experts models (open_clip-style interface)."""
from .checkpoint import ExportError, save
from .config import AuxLossWeights, LIMoEConfig, MoEConfig, TwoTowerConfig, get_config, list_models
from .embedder import Embedder  # torch/numpy/PIL only: `import limoe` never imports fastapi
from .factory import create_model, create_model_and_transforms, load
from .model import LIMoE
from .tokenizer import BPETokenizer, Tokenizer, load_tokenizer

__all__ = [
    "AuxLossWeights", "BPETokenizer", "ExportError", "LIMoE", "LIMoEConfig", "MoEConfig", "Tokenizer",
    "TwoTowerConfig", "create_model", "create_model_and_transforms", "get_config", "list_models", "load",
    "load_tokenizer", "save",
]
