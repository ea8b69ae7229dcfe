"""Model backends: the only place that knows model classes."""

from mukv.backends.transformers_api import check_transformers

check_transformers()  # an older transformers would run without the video context, silently

from mukv.backends.base import Backend, TextModelSpec  # noqa: E402
from mukv.backends.llava_onevision import LlavaOnevisionBackend, load_backend  # noqa: E402
from mukv.backends.prompts import PromptTemplate  # noqa: E402
from mukv.backends.tiny import TinyModelSpec, build_tiny_model  # noqa: E402

__all__ = [
    "Backend",
    "LlavaOnevisionBackend",
    "PromptTemplate",
    "TextModelSpec",
    "TinyModelSpec",
    "build_tiny_model",
    "load_backend",
]
