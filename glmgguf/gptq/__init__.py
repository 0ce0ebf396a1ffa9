"""GPTQ INT4 (W4A16) export for vLLM / SGLang: compressed-tensors pack-quantized or the classic GPTQ layout."""
