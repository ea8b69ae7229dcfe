"""Model backends: the only place that knows model classes."""

from mukv.backends.base import Backend, TextModelSpec
from mukv.backends.llava_onevision import LlavaOnevisionBackend, load_backend
from mukv.backends.prompts import PromptTemplate
from mukv.backends.tiny import TinyModelSpec, build_tiny_model

__all__ = [
    "Backend",
    "LlavaOnevisionBackend",
    "PromptTemplate",
    "TextModelSpec",
    "TinyModelSpec",
    "build_tiny_model",
    "load_backend",
]
