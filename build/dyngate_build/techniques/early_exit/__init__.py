"""Early exit (DeeBERT off-ramps): `api` holds the config and the two registered techniques; `segments` cuts a
model, `ramps` trains the off-ramps, `onnx_export` and `torchscript_export` write the servable graphs, `thresholds`
picks the default threshold and measures the curve."""
