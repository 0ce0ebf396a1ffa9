"""Model cards (README.md with YAML front matter) built only from a build's manifests and measurements.

`facts` gathers what an output's manifests and files say into typed dataclasses, `hardware` sizes the KV cache
and picks the GPU sets a build fits, `render` writes the markdown, `pipeline` writes a card next to every output of
a plan with a family table linking them, and `cli` is `glmgguf card`.
"""
