"""mistral_trt.export: Hugging Face Mistral checkpoint -> verified ONNX with KV cache (needs the [export] extra)."""
