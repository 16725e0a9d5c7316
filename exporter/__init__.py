"""fips_rt.exporter: ONNX export of dense and compressed models."""
