"""engine: declarative YAML recipes for LLM quantization, with a model registry."""

__version__ = "0.1.0"
