"""Capture: calibration tokens, hooks that record each residual block's input and output, MoE router
statistics, whole-model profiling and layer-major streaming (with resume) into the spectral core."""
