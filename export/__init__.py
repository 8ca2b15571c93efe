"""edgert's exporter: Hugging Face folder -> self-contained ONNX artifact. Never imported by the runtime."""
from .artifact import ExportError, export

__all__ = ["export", "ExportError"]
