"""Router-KD: distill a pruned model's MoE routers (gate matrices only) to the unpruned teacher.

`teacher` caches the teacher's top-k next-token distributions, `loss` is the sparse KL with the missing mass as
one bucket, `train` trains the routers and writes the student with only those tensors changed, `evaluate`
measures KL(teacher || model) and top-1 agreement on held-out text, `cli` is `glmgguf kd`.
"""
