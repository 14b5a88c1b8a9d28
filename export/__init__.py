"""mistral_trt.export: Hugging Face Mistral checkpoint -> verified ONNX with KV cache, and TensorRT engines from any
export folder (needs the [export] extra; TensorRT: [tensorrt-cu12|cu13])."""
