"""Quantization: `core` holds what the quantizing techniques share (calibration feeds, group quantization,
quantizable linears, low-bit distillation); one module per registered technique beside it."""
