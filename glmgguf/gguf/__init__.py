"""GGUF output for llama.cpp's `glm-dsa` architecture: plan, metadata, vocab, encoding, streaming writer."""
