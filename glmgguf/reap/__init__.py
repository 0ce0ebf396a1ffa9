"""REAP expert pruning (arXiv 2510.13999) for GLM-5.x: observe routing, score experts, prune, report.

`observe` records per-expert statistics with GLM's real routing (`routing`), in memory or streaming one layer at
a time (`glmgguf.runner`); `stats` saves / loads / merges them; `prune` plans and writes the pruned checkpoint;
`report` draws them; `data` packs calibration text.
"""
