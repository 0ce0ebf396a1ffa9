"""REAP observation statistics: per MoE layer (MTP block included) and per routed expert.

Saved as one safetensors file (tensors `layer.{L}.{field}`, metadata with the model fingerprint and the run's
settings) plus a JSON summary beside it. Statistics of several runs over the same model merge exactly: counts and
sums add, maxima take the max.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glmgguf.choices import REAP_METRICS as METRICS
from glmgguf.io import atomic_file
from glmgguf.layout import GlmLayout
from glmgguf.reap.errors import StatsError

if TYPE_CHECKING:
    from glmgguf.dist import Dist

FORMAT = "glmgguf.reap.stats/1"

# name -> (dtype, how runs merge)
FIELDS: dict[str, tuple[torch.dtype, str]] = {
    "count": (torch.int64, "sum"),  # tokens routed to the expert (it is in their top-k)
    "weight_sum": (torch.float64, "sum"),  # sum of g_j(x)
    "reap_sum": (torch.float64, "sum"),  # sum of g_j(x) * ||f_j(x)||_2          (REAP saliency = reap_sum / count)
    "ean_sum": (torch.float64, "sum"),  # sum of ||f_j(x)||_2                    (EAN)
    "max_norm": (torch.float32, "max"),  # max ||f_j(x)||_2
    "input_amax": (torch.float32, "max"),  # max |x| over routed tokens (input of gate_proj / up_proj)
    "down_input_amax": (torch.float32, "max"),  # max |act(gate x) * up x| (input of down_proj)
}



def empty_layer(n_experts: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return {k: torch.zeros(n_experts, dtype=dt, device=device) for k, (dt, _) in FIELDS.items()}


def model_fingerprint(layout: GlmLayout) -> dict:
    """What must agree between the observed model and the model being pruned."""
    return {
        "hidden_size": layout.hidden_size,
        "n_layers": layout.n_layers,
        "n_mtp": layout.n_mtp,
        "experts": {str(x.index): x.n_experts for x in layout.moe_layers},
    }


@dataclass
class ReapStats:
    """Per-layer expert statistics plus the tokens each layer saw."""

    fingerprint: dict
    layers: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # run settings (data, seq_len, dtype, mode, ...)

    # -- scores ---------------------------------------------------------------------------------------------
    def n_experts(self, layer: int) -> int:
        return int(self.layers[layer]["count"].numel())

    def score(self, layer: int, metric: str, seed: int = 0) -> torch.Tensor:
        """Saliency of every expert of `layer` (higher = keep): reap (mean g*||f|| over routed tokens),
        frequency (routed-token count), ean (sum of ||f||) or random (a seeded permutation)."""
        s = self.layers[layer]
        if metric == "reap":
            return s["reap_sum"] / s["count"].clamp_min(1).double()
        if metric == "frequency":
            return s["count"].double()
        if metric == "ean":
            return s["ean_sum"].clone()
        if metric == "random":
            gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
            return torch.randperm(self.n_experts(layer), generator=gen).double()
        raise StatsError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")

    # -- checks ---------------------------------------------------------------------------------------------
    def check_model(self, layout: GlmLayout, what: str = "the model") -> None:
        """Raise StatsError unless these statistics were taken on a model with `layout`'s MoE layers."""
        want = model_fingerprint(layout)
        have = self.fingerprint
        if have.get("hidden_size") != want["hidden_size"] or have.get("n_layers") != want["n_layers"]:
            raise StatsError(
                f"statistics are from another model (hidden {have.get('hidden_size')}, {have.get('n_layers')} "
                f"layers) than {what} (hidden {want['hidden_size']}, {want['n_layers']} layers)")
        for key, n in want["experts"].items():
            got = have.get("experts", {}).get(key)
            if got != n:
                raise StatsError(f"statistics are from another model: layer {key} has {n} experts in {what}, "
                                 f"{got} in the statistics")
            if int(key) not in self.layers:
                raise StatsError(f"statistics lack MoE layer {key} (observe with the MTP block to prune it)")

    # -- merge ----------------------------------------------------------------------------------------------
    def merge(self, other: ReapStats) -> ReapStats:
        """Statistics of both runs together (same model required)."""
        if self.fingerprint != other.fingerprint:
            raise StatsError("cannot merge statistics of different models")
        if set(self.layers) != set(other.layers):
            raise StatsError(f"cannot merge statistics over different layers: {sorted(self.layers)} vs "
                             f"{sorted(other.layers)}")
        out = ReapStats(self.fingerprint, {}, {}, {"merged": [self.meta, other.meta]})
        for L, a in self.layers.items():
            b = other.layers[L]
            out.layers[L] = {k: (a[k] + b[k]) if how == "sum" else torch.maximum(a[k], b[k])
                             for k, (_, how) in FIELDS.items()}
            out.tokens[L] = self.tokens.get(L, 0) + other.tokens.get(L, 0)
        return out

    def all_reduce(self, dist: Dist) -> ReapStats:
        """Every rank's statistics combined as `merge` combines runs (sums and counts add, maxima take the max),
        on every rank; the run settings are rank 0's, with the longest rank's seconds."""
        out = ReapStats(self.fingerprint, {}, {}, dict(self.meta))
        for L, t in sorted(self.layers.items()):
            out.layers[L] = {k: dist.all_reduce(t[k], how) for k, (_, how) in FIELDS.items()}
            out.tokens[L] = int(dist.all_reduce(torch.tensor([self.tokens.get(L, 0)]), "sum")[0])
        if "seconds" in self.meta:
            t = dist.all_reduce(torch.tensor([float(self.meta["seconds"])], dtype=torch.float64), "max")
            out.meta["seconds"] = round(float(t[0]), 3)
        out.meta["ranks"] = dist.world
        return out

    def select(self, keep: dict[int, list[int]]) -> ReapStats:
        """The statistics of a pruned model: each layer restricted to its kept experts (in keep order)."""
        fp = dict(self.fingerprint)
        fp["experts"] = {k: (len(keep[int(k)]) if int(k) in keep else v) for k, v in fp["experts"].items()}
        out = ReapStats(fp, {}, dict(self.tokens), dict(self.meta))
        for L, t in self.layers.items():
            ids = torch.tensor(keep.get(L, list(range(self.n_experts(L)))), dtype=torch.long)
            out.layers[L] = {k: v[ids].clone() for k, v in t.items()}
        return out

    # -- I/O ------------------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for L, t in sorted(self.layers.items()):
            for k, v in t.items():
                out[f"layer.{L}.{k}"] = v.detach().cpu().contiguous()
            out[f"layer.{L}.tokens"] = torch.tensor([self.tokens.get(L, 0)], dtype=torch.int64)
        return out

    def save(self, path: str | os.PathLike, force: bool = False) -> tuple[Path, Path]:
        """Write `path` (safetensors) and `path` with suffix .json (a readable summary), atomically."""
        path = Path(path)
        metadata = {"format": FORMAT, "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
                    "meta": json.dumps(self.meta, sort_keys=True)}
        with atomic_file(path, force=force) as tmp:
            save_file(self.tensors(), str(tmp), metadata=metadata)
        summary = path.with_suffix(".json")
        with atomic_file(summary, force=True) as tmp:
            tmp.write_text(json.dumps(self.summary(), indent=1) + "\n")
        return path, summary

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReapStats:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"statistics file {path} not found")
        try:
            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
                if md.get("format") != FORMAT:
                    raise StatsError(f"{path} is not a REAP statistics file (format {md.get('format')!r})")
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except StatsError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise StatsError(f"{path}: unreadable statistics file ({e})") from None
        stats = cls(json.loads(md["fingerprint"]), {}, {}, json.loads(md.get("meta", "{}")))
        for name, t in tensors.items():
            _, L, k = name.split(".", 2)
            if k == "tokens":
                stats.tokens[int(L)] = int(t[0])
            else:
                stats.layers.setdefault(int(L), {})[k] = t
        for L, t in stats.layers.items():
            missing = set(FIELDS) - set(t)
            if missing:
                raise StatsError(f"{path}: layer {L} lacks {sorted(missing)}")
        return stats

    @classmethod
    def load_many(cls, paths: list[str | os.PathLike]) -> ReapStats:
        """Load and merge one or more statistics files."""
        if not paths:
            raise StatsError("no statistics given")
        stats = cls.load(paths[0])
        for p in paths[1:]:
            stats = stats.merge(cls.load(p))
        return stats

    # -- summary --------------------------------------------------------------------------------------------
    def layer_summary(self, L: int) -> dict:
        t = self.layers[L]
        count = t["count"].double()
        total = float(count.sum())
        p = count / total if total else count
        ent = float(-(p * p.clamp_min(1e-300).log()).sum() / math.log(len(p))) if total and len(p) > 1 else 0.0
        reap = self.score(L, "reap")
        order = torch.argsort(reap, descending=True)
        return {
            "tokens": self.tokens.get(L, 0),
            "experts": len(count),
            "never_routed": int((t["count"] == 0).sum()),
            "load_entropy": round(ent, 6),
            "reap_min": float(reap.min()), "reap_median": float(reap.median()), "reap_max": float(reap.max()),
            "top_experts": order[:8].tolist(),
            "bottom_experts": order[-8:].flip(0).tolist(),
        }

    def summary(self) -> dict:
        return {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "meta": self.meta,
            "layers": {str(L): self.layer_summary(L) for L in sorted(self.layers)},
        }
