"""mistral_trt.calib: calibration data, reduced-precision exports (fp16, int8 Q/DQ, MatMulNBits) and the quality report."""
