"""limoe: LIMoE sparse multimodal mixture-of-experts models (open_clip-style interface)."""
import os as _os

import torch as _torch

# Without a GPU, tell DeepSpeed so up front: its auto-detection otherwise prints a
# warning on stdout at import, which would corrupt machine-readable output.
if "DS_ACCELERATOR" not in _os.environ and not _torch.cuda.is_available():
    _os.environ["DS_ACCELERATOR"] = "cpu"

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
