"""The CPU workspace paths of the quantised products (``dgemma.quant.kernels``) against the reference path
(dequantise into a fresh tensor, then matmul): the dequantised weights equal ``formats``' bit for bit (odd
widths, short last groups, bf16), so the products equal the reference's; blocks of output rows, empty
inputs, inference mode, threads, autograd, and the modules (linear, experts, embedding) on both paths."""

import threading

import pytest
import torch
import torch.nn.functional as F

from dgemma.quant import formats, kernels, modules
from dgemma.quant.modules import Int8Embedding, QuantizedWeight


def gaussian(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


SHAPES = [(40, 72, 64), (40, 72, 16), (7, 47, 7), (5, 24, 64), (33, 130, 64), (64, 512, 64), (3, 1, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,k,group", SHAPES)
def test_workspace_weights_equal_the_formats_dequantization(n, k, group, dtype):
    w = gaussian(n, k) * 0.05
    w[0] = 0.0  # an all-zero row: scale 0
    codes, scale = formats.quantize_int8(w)
    assert torch.equal(kernels.int8_weight(codes, scale, dtype), formats.dequantize_int8(codes, scale, dtype))
    packed, scale4 = formats.quantize_int4(w, group)
    assert torch.equal(kernels.int4_weight(packed, scale4, k, group, dtype),
                       formats.dequantize_int4(packed, scale4, k, group, dtype))


@pytest.mark.parametrize("n,k,group", SHAPES)
def test_products_equal_the_reference_products(n, k, group):
    w, x = gaussian(n, k) * 0.05, gaussian(2, 9, k, seed=1)
    codes, scale = formats.quantize_int8(w)
    want = F.linear(x, formats.dequantize_int8(codes, scale))
    assert torch.equal(kernels.int8_linear(x, codes, scale), want)
    packed, scale4 = formats.quantize_int4(w, group)
    want4 = F.linear(x, formats.dequantize_int4(packed, scale4, k, group))
    torch.testing.assert_close(kernels.int4_linear(x, packed, scale4, k, group), want4, rtol=0, atol=0)


def test_blocks_of_output_rows_and_empty_inputs(monkeypatch):
    monkeypatch.setattr(kernels, "BLOCK_ELEMENTS", 10 * 72)  # 10 rows per block, the last one short
    w, x = gaussian(43, 72) * 0.05, gaussian(6, 72, seed=1)
    codes, scale = formats.quantize_int8(w)
    want = x.double() @ formats.dequantize_int8(codes, scale, torch.float64).T
    got = kernels.int8_linear(x, codes, scale)
    assert got.shape == (6, 43)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    packed, scale4 = formats.quantize_int4(w, 16)
    want4 = x.double() @ formats.dequantize_int4(packed, scale4, 72, 16, torch.float64).T
    got4 = kernels.int4_linear(x, packed, scale4, 72, 16)
    torch.testing.assert_close(got4.double(), want4, rtol=1e-5, atol=1e-5 * float(want4.abs().max()))
    assert kernels.workspace("weight", (0, 72), torch.float32, x.device).numel() == 0
    assert kernels.int8_linear(x[:0], codes, scale).shape == (0, 43)
    assert kernels.int4_linear(x[:0], packed, scale4, 72, 16).shape == (0, 43)


def test_workspaces_work_in_and_out_of_inference_mode_and_per_thread():
    kernels.release_workspaces()
    w, x = gaussian(8, 32) * 0.05, gaussian(3, 32, seed=1)
    codes, scale = formats.quantize_int8(w)
    want = F.linear(x, formats.dequantize_int8(codes, scale))
    with torch.inference_mode():  # the workspace is made here, then written outside inference mode
        assert torch.equal(kernels.int8_linear(x, codes, scale), want)
    assert torch.equal(kernels.int8_linear(x, codes, scale), want)
    with torch.no_grad():
        assert torch.equal(kernels.int8_linear(x, codes, scale), want)
    mine = kernels.workspace("weight", (8, 32), torch.float32, x.device)
    assert kernels.workspace("weight", (8, 32), torch.float32, x.device) is mine  # the view is cached
    assert kernels.workspace("weight", (2, 4), torch.float32, x.device).data_ptr() == mine.data_ptr()
    big = kernels.workspace("weight", (64, 64), torch.float32, x.device)  # grows: a new buffer, views dropped
    assert kernels.workspace("weight", (8, 32), torch.float32, x.device).data_ptr() == big.data_ptr()
    seen = []
    thread = threading.Thread(target=lambda: seen.append(kernels.workspace("weight", (1,), torch.float32, x.device)))
    thread.start()
    thread.join()
    assert seen[0].data_ptr() != big.data_ptr()  # each thread its own buffer


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_weight_takes_the_workspace_path_and_equals_the_reference(scheme):
    qw = QuantizedWeight(gaussian(6, 40, 64) * 0.05, scheme, 32)  # experts [E, out, in]
    x = gaussian(7, 64, seed=2)
    qw.fast = False
    ref = qw.product(x, 3)
    qw.fast = None
    assert kernels.supported(x, scheme) and not (scheme == "int8" and modules.uses_int8_kernel(x, None))
    assert torch.equal(qw.product(x, 3), ref)
    x.requires_grad_(True)  # autograd: the reference path, gradients flow to x
    assert not kernels.supported(x)
    qw.product(x, 3).sum().backward()
    torch.testing.assert_close(x.grad, qw.dequantize(torch.float32, 3).sum(0).expand(7, 64))


def test_int8_embedding_readers_equal_on_both_paths(monkeypatch):
    monkeypatch.setattr(modules, "EMBED_BLOCK", 64)
    monkeypatch.setattr(kernels, "BLOCK_ELEMENTS", 40 * 24)  # workspace blocks of 40 rows, smaller than 64
    emb = torch.nn.Embedding(150, 24)
    with torch.no_grad():
        emb.weight.copy_(gaussian(150, 24))
    q = Int8Embedding(emb)
    h, probs = gaussian(2, 3, 24, seed=4), torch.softmax(gaussian(2, 3, 150, seed=5), -1)
    results = {}
    for fast in (False, None):
        q.q.fast = fast
        out = torch.full((6, 40), float("nan"))
        q.logits_block(h.reshape(6, 24), 60, 100, out)
        results[fast] = (q.logits(h), out, q.soft_embed(probs))
    for ref, got in zip(results[False], results[None]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
