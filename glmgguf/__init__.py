"""glmgguf: GLM-5.x MoE checkpoints to GGUF / NVFP4, with REAP pruning and router distillation."""

__version__ = "0.1.0"
