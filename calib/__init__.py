"""mistral_trt.calib: calibration data and reduced-precision models (see the precision issue)."""
