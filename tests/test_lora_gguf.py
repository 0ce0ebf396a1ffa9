"""kd lora-gguf: a LoRA adapter GGUF that the pinned llama.cpp applies (`--lora`) to the student's converted GGUF
gives transformers + PEFT's logits (co-trained router gates included); modules llama.cpp cannot adapt are one clear
error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_convert
import test_kd
import torch
from click.testing import CliRunner
from gguf import GGUFReader
from safetensors.torch import load_file, save_file

from glmgguf.cli import main
from glmgguf.gguf.convert import convert, outtype_chooser
from glmgguf.gguf.plan import IndexerMode, MtpMode
from glmgguf.kd.errors import KdError
from glmgguf.kd.lora import LoraOptions, train_lora
from glmgguf.kd.lora_gguf import write_lora_gguf
from glmgguf.kd.student import Student
from glmgguf.layout import GlmLayout
from glmgguf.parity import kl_stats, llama_logits

texts, pruned, kd_cache = test_kd.texts, test_kd.pruned, test_kd.kd_cache
parity_ids = test_convert.parity_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _opts(targets: tuple[str, ...], steps: int = 6, **kw) -> LoraOptions:
    train = test_kd.TrainOptions(steps=steps, lr=1e-2, batch_size=4, mtp=False, save_every=0)
    return LoraOptions(train=train, targets=targets, rank=4, alpha=8.0, **kw)


@pytest.fixture(scope="module")
def base_gguf(pruned, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loragguf") / "student.gguf"
    convert(pruned, out, outtype_chooser("f32"), MtpMode.KEEP, IndexerMode.NATIVE, progress=False)
    return out


def _peft_logits(student: Path, adapter: Path | None, ids: list[int]) -> torch.Tensor:
    from peft import PeftModel

    model = Student(student, mtp=False).model
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([ids])).logits[0]


def _o_proj_adapter(student: Path, out: Path) -> None:
    """An adapter on every trunk o_proj with random (non-zero) A and B: the attention output path."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    layout = GlmLayout.from_dir(student)
    mods = [f"model.layers.{x.index}.self_attn.o_proj" for x in layout.layers if not x.is_mtp]
    model = get_peft_model(Student(student, mtp=False).model,
                           LoraConfig(r=2, lora_alpha=3.0, target_modules=mods, init_lora_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.mul_(0.5)
    model.save_pretrained(out)


@pytest.mark.parametrize("kind", ["trained shared,dense", "trained shared + gates", "o_proj"])
def test_llama_cpp_lora_matches_peft(pruned, kd_cache, base_gguf, parity_ids, llama_toolchain, tmp_path, kind):
    assert len(parity_ids) > GlmLayout.from_dir(pruned).index_topk  # sparse DSA active
    adapter = tmp_path / "adapter"
    if kind == "o_proj":
        _o_proj_adapter(pruned, adapter)
    elif kind == "trained shared + gates":
        train_lora(pruned, kd_cache, adapter, _opts(("shared",), train_gates=True, gate_lr=3e-2))
    else:
        train_lora(pruned, kd_cache, adapter, _opts(("shared", "dense")))
    r = CliRunner().invoke(main, ["kd", "lora-gguf", str(adapter), str(tmp_path / "a.gguf"), "--base", str(pruned)])
    assert r.exit_code == 0, r.output
    fields = GGUFReader(tmp_path / "a.gguf").fields
    assert bytes(fields["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(fields["adapter.type"].parts[-1]).decode() == "lora"

    base = kl_stats(_peft_logits(pruned, None, parity_ids), llama_logits(llama_toolchain, base_gguf, parity_ids))
    ref = _peft_logits(pruned, adapter, parity_ids)
    got = llama_logits(llama_toolchain, base_gguf, parity_ids, lora=tmp_path / "a.gguf")
    lora = kl_stats(ref, got)
    moved = kl_stats(llama_logits(llama_toolchain, base_gguf, parity_ids), got)
    print(f"{kind}: base {base}; with LoRA {lora}; base vs base+LoRA in llama.cpp {moved}")
    assert base.mean < 1e-5 and lora.mean < 1e-5, (base, lora)
    assert lora.top1_agreement == 1.0
    assert moved.mean > 1e-3, moved  # the adapter really changes the output
    if kind == "trained shared + gates":  # the gates alone (lora_B zeroed): applied by llama.cpp, not ignored
        state = load_file(adapter / "adapter_model.safetensors")
        save_file({k: v.zero_() if ".lora_B." in k else v for k, v in state.items()},
                  adapter / "adapter_model.safetensors")
        r = CliRunner().invoke(main, ["kd", "lora-gguf", str(adapter), str(tmp_path / "a.gguf"), "--base",
                                      str(pruned), "--force"])
        assert r.exit_code == 0, r.output
        got = llama_logits(llama_toolchain, base_gguf, parity_ids, lora=tmp_path / "a.gguf")
        gates = kl_stats(_peft_logits(pruned, adapter, parity_ids), got)
        moved = kl_stats(llama_logits(llama_toolchain, base_gguf, parity_ids), got)
        print(f"gates alone: with LoRA {gates}; base vs base+LoRA in llama.cpp {moved}")
        assert gates.mean < 1e-5 and moved.mean > 1e-4, (gates, moved)


def test_unsupported_modules_are_refused(pruned, kd_cache, tmp_path):
    train_lora(pruned, kd_cache, tmp_path / "attn", _opts(("attn", "shared"), steps=1))
    with pytest.raises(KdError, match=r"self_attn\.kv_a_proj_with_mqa .*applies no LoRA.*--merge"):
        write_lora_gguf(tmp_path / "attn", pruned, tmp_path / "x.gguf")
    r = CliRunner().invoke(main, ["kd", "lora-gguf", str(tmp_path / "attn"), str(tmp_path / "x.gguf"),
                                  "--base", str(pruned)])
    assert r.exit_code != 0 and "applies no LoRA" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.partial").exists()
    train_lora(pruned, kd_cache, tmp_path / "full", _opts(("shared",), steps=1, train_gates=True))
    cfg = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    (tmp_path / "full" / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": ["lm_head"]}))
    with pytest.raises(KdError, match="full modules other than the router gates.*lm_head.*--merge"):
        write_lora_gguf(tmp_path / "full", pruned, tmp_path / "x.gguf")


def test_merged_checkpoint_converts_to_the_same_logits(pruned, kd_cache, parity_ids, llama_toolchain, tmp_path):
    """The adapters the GGUF adapter cannot carry (all MLA projections) go through `--merge`: the merged checkpoint
    converts, llama.cpp gives its transformers logits with sparse DSA active, and those are transformers + PEFT's
    up to the merged weights' BF16 storage."""
    train_lora(pruned, kd_cache, tmp_path / "adapter", _opts(("attn", "shared"), train_gates=True),
               merge=tmp_path / "merged")
    convert(tmp_path / "merged", tmp_path / "m.gguf", outtype_chooser("f32"), MtpMode.KEEP, IndexerMode.NATIVE,
            progress=False)
    got = llama_logits(llama_toolchain, tmp_path / "m.gguf", parity_ids)
    merged = kl_stats(_peft_logits(tmp_path / "merged", None, parity_ids), got)
    peft = kl_stats(_peft_logits(pruned, tmp_path / "adapter", parity_ids), got)
    moved = kl_stats(_peft_logits(pruned, None, parity_ids), got)
    print(f"merged GGUF vs transformers on the merged checkpoint {merged}; vs PEFT {peft}; vs the base {moved}")
    assert merged.mean < 1e-5 and merged.top1_agreement == 1.0, merged  # measured 1.2e-10
    assert peft.mean < 3e-5 and moved.mean > 1e-2, (peft, moved)  # measured 3.8e-6 (BF16 storage) and 3.6e-2
