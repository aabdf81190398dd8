"""Target models (own Llama-family implementation), attention backends and weight loading."""

from .config import ModelConfig
from .loader import DEFAULT_MODEL_NAME, LoadedModel, default_model_path, load_model

__all__ = ["ModelConfig", "LoadedModel", "load_model", "default_model_path", "DEFAULT_MODEL_NAME"]
