"""mistral_trt: Mistral-architecture checkpoints -> verified ONNX with KV cache -> fast inference.

The pipeline, one subpackage a stage: mistral_trt.export (checkpoint -> ONNX + manifest; TensorRT engines),
mistral_trt.calib (reduced precision), mistral_trt.runtime (numpy + onnxruntime, no torch), mistral_trt.bench.
runtime imports none of the others; export uses runtime; calib uses both; bench and this package's `mistral-trt`
command (main.py) sit on top.
"""
__version__ = "0.1.0"
