"""NVFP4 export: ModelOpt-exact quantization math and ModelOpt / compressed-tensors checkpoint writers."""
