"""NVFP4: bit-exactness with nvidia-modelopt, export (ModelOpt and compressed-tensors layouts), dequantized
accuracy, serving-engine loadability (structural), bad input."""

from __future__ import annotations

import pytest
import torch

from glmgguf.io import CheckpointReader
from glmgguf.layout import Role, parse_hf_name
from glmgguf.nvfp4 import quant as nq


@pytest.fixture(scope="module")
def modelopt_nvfp4():
    """ModelOpt's NVFP4QTensor (the reference quantizer; the `test` extra installs nvidia-modelopt)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = pytest.importorskip("modelopt.torch.quantization.qtensor.nvfp4_tensor")
    return mod.NVFP4QTensor


def _assert_same_as_modelopt(ref_cls, w: torch.Tensor, s2: torch.Tensor | None = None) -> nq.Nvfp4Weight:
    """Our packed weight, block scales and global scale equal ModelOpt's bytes for the same weight_scale_2."""
    s2 = nq.global_scale(nq.amax(w)) if s2 is None else s2
    ours = nq.quantize(w, s2)
    q, scale, scale_2 = ref_cls.quantize(w.clone(), nq.BLOCK_SIZE, weights_scaling_factor_2=s2.clone())
    assert torch.equal(ours.weight, q._quantized_data)
    assert torch.equal(ours.weight_scale.view(torch.uint8), scale.view(torch.uint8))
    assert torch.equal(ours.weight_scale_2.view(torch.int32), scale_2.float().reshape(()).view(torch.int32))
    deq = q.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: nq.BLOCK_SIZE})
    assert torch.equal(ours.dequantize(), deq)
    return ours


# ---------------------------------------------------------------------------------------------------------------
# Quantization math
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_random_weights_match_modelopt(modelopt_nvfp4, dtype):
    gen = torch.Generator().manual_seed(0)
    # heavy-tailed rows and columns: block scales over the whole e4m3 range, clamped ones included
    w = torch.randn(96, 512, generator=gen) * torch.logspace(-4, 1, 96).unsqueeze(1)
    w[:, ::37] *= 20
    _assert_same_as_modelopt(modelopt_nvfp4, w.to(dtype))
    _assert_same_as_modelopt(modelopt_nvfp4, torch.randn(3, 4096, generator=gen).to(dtype))


def test_global_scale_is_modelopts(modelopt_nvfp4):
    w = torch.randn(64, 256).bfloat16()
    assert torch.equal(nq.global_scale(nq.amax(w)), modelopt_nvfp4.get_weights_scaling_factor_2(w))


def test_all_zero_blocks_and_tensors(modelopt_nvfp4):
    w = torch.randn(8, 64).bfloat16()
    w[0] = 0
    w[3, 16:48] = 0
    w[5, :16] = -0.0
    ours = _assert_same_as_modelopt(modelopt_nvfp4, w)
    assert ours.weight_scale[0].float().eq(1.0).all()  # an all-zero block gets scale 1.0 ...
    assert ours.weight[0].eq(0).all()  # ... and code 0
    # an all-zero tensor: ModelOpt's own default would give NaN scales; ours gives amax := 1 (zeros after dequant)
    z = torch.zeros(4, 32, dtype=torch.bfloat16)
    assert float(nq.global_scale(nq.amax(z))) == pytest.approx(1 / 2688)
    zq = _assert_same_as_modelopt(modelopt_nvfp4, z)
    assert zq.dequantize().eq(0).all() and zq.weight.eq(0).all()


def test_saturation(modelopt_nvfp4):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 128, generator=gen).bfloat16()
    # a global scale 10x too small: block scales clamp at 448 and the largest values saturate at +-6
    small = nq.global_scale(nq.amax(w)) / 10
    ours = _assert_same_as_modelopt(modelopt_nvfp4, w, small)
    codes = nq.unpack_codes(ours.weight)
    assert ((codes & 7) == 7).any() and ours.weight_scale.float().eq(448).any()


def test_ties_round_to_even(modelopt_nvfp4):
    # weight_scale_2 = 2^-8 and a block amax of 6 * 2^-8 give block scale exactly 1: the scaled values are exact
    s2 = torch.tensor(2.0**-8)
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    row = torch.tensor([6.0] + mids + [-m for m in mids] + [0.1]) * 2.0**-8
    ours = _assert_same_as_modelopt(modelopt_nvfp4, row.reshape(1, 16), s2)
    codes = nq.unpack_codes(ours.weight)[0].tolist()
    # 0.25->0, 0.75->1.0, 1.25->1.0, 1.75->2.0, 2.5->2.0, 3.5->4.0, 5->4.0 (even codes), negatives with sign bit
    assert codes == [7, 0, 2, 2, 4, 4, 6, 6, 8, 10, 10, 12, 12, 14, 14, 0]


def test_tiny_amax(modelopt_nvfp4):
    gen = torch.Generator().manual_seed(2)
    for scale in (1e-12, 1e-30):
        _assert_same_as_modelopt(modelopt_nvfp4, (torch.randn(4, 64, generator=gen) * scale).float())
    _assert_same_as_modelopt(modelopt_nvfp4, (torch.randn(4, 64, generator=gen) * 1e-30).bfloat16())
    w = torch.randn(4, 64, generator=gen).bfloat16()
    w[1] *= 1e-20  # blocks far below the tensor amax: scale clamped at 2^-9, values flush to (signed) zero
    ours = _assert_same_as_modelopt(modelopt_nvfp4, w)
    assert ours.weight_scale[1].float().eq(2.0**-9).all()
    with pytest.raises(nq.Nvfp4Error):
        nq.global_scale(torch.tensor(1e-44))


def test_shared_scale_pair_matches_modelopt(modelopt_nvfp4):
    gen = torch.Generator().manual_seed(3)
    gate, up = torch.randn(64, 128, generator=gen).bfloat16(), (3 * torch.randn(64, 128, generator=gen)).bfloat16()
    s2 = nq.global_scale(torch.maximum(nq.amax(gate), nq.amax(up)))
    _assert_same_as_modelopt(modelopt_nvfp4, gate, s2)
    _assert_same_as_modelopt(modelopt_nvfp4, up, s2)


def _expert_weights(path, limit: int):
    reader = CheckpointReader(path)
    names = [n for n in reader.names() if (p := parse_hf_name(n)) is not None
             and p.rule.role in (Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN)]
    return [reader.get(n) for n in sorted(names)[:limit]]


@pytest.mark.parametrize("which", ["tiny_testbed_dir", "trained_testbed_dir"])
def test_real_weights_match_modelopt(modelopt_nvfp4, which, request):
    for w in _expert_weights(request.getfixturevalue(which), 12):
        _assert_same_as_modelopt(modelopt_nvfp4, w)


def test_dequantize_within_error_bound():
    gen = torch.Generator().manual_seed(4)
    w = (torch.randn(128, 256, generator=gen) * torch.logspace(-3, 0, 128).unsqueeze(1)).bfloat16()
    for s2 in (None, nq.global_scale(nq.amax(w)) / 4):  # own scale, and a saturating one
        q = nq.quantize(w, s2)
        err = (q.dequantize() - w.float()).abs()
        assert (err <= nq.error_bound(q.weight_scale, q.weight_scale_2, w)).all()


def test_chunking_does_not_change_bytes():
    w = torch.randn(100, 96).bfloat16()
    a, b = nq.quantize(w), nq.quantize(w, chunk_elements=96 * 7)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.weight_scale.view(torch.uint8),
                                                           b.weight_scale.view(torch.uint8))


def test_rejects_bad_weights():
    with pytest.raises(nq.Nvfp4Error, match="multiple of 16"):
        nq.quantize(torch.randn(4, 24))
    with pytest.raises(nq.Nvfp4Error, match="inf or NaN"):
        nq.quantize(torch.tensor([[float("nan")] + [0.0] * 15]), torch.tensor(1.0))
    with pytest.raises(nq.Nvfp4Error, match="2-D"):
        nq.quantize(torch.randn(16))
    with pytest.raises(nq.Nvfp4Error):
        nq.input_scale(0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bytes_equal_cpu():
    gen = torch.Generator().manual_seed(5)
    w = (torch.randn(512, 1024, generator=gen) * torch.logspace(-5, 1, 512).unsqueeze(1)).bfloat16()
    w[7] = 0
    cpu = nq.quantize(w)
    gpu = nq.quantize(w.cuda())
    assert torch.equal(cpu.weight, gpu.weight.cpu())
    assert torch.equal(cpu.weight_scale.view(torch.uint8), gpu.weight_scale.cpu().view(torch.uint8))
    assert torch.equal(cpu.weight_scale_2, gpu.weight_scale_2.cpu())
