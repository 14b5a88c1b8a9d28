"""mistral_trt: Mistral-architecture checkpoints -> verified ONNX with KV cache -> fast inference.

Packages: mistral_trt.runtime (numpy + onnxruntime, no torch), mistral_trt.export (torch, transformers),
mistral_trt.calib. export and calib may use runtime, never the reverse. This package is only the
`mistral-trt` command (main.py).
"""
__version__ = "0.1.0"
