"""fips_rt.runtime: torch-free onnxruntime inference for exported fips-rt models."""
