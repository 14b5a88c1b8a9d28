"""mistral_trt.bench: measurements side by side with baselines (above runtime, export and calib; nothing imports it)."""
