"""mistral_trt.runtime: drive an exported model with numpy + onnxruntime (no torch, no transformers)."""
from .errors import UserError
from .manifest import Manifest, ModelArgs, TensorSpec

__all__ = ["Manifest", "ModelArgs", "TensorSpec", "UserError"]
