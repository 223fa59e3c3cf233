"""The error-bounded all-to-all codec (torchrec_tt.distributed.comm_codec), single process.

Oracles written here, independent of the codec's code: a NumPy parser of the documented wire
format (bf16 / fp32 scale header, int8 / int16 / nibble codes), the error bound computed in
float64 from its definition, and byte counts from the format's arithmetic.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from torchrec_tt.distributed import comm_codec as cc
from torchrec_tt.distributed.comm_codec import (
    BoundSchedule,
    ErrorBoundedCommCodec,
    ErrorBoundPolicy,
    get_error_bounded_codecs_registry,
    make_comm_codecs_registry,
)

SLACK = 2.0**-6
FLT_MAX = float(np.finfo(np.float32).max)


def codec(bits: int, block: int, **policy_kwargs) -> ErrorBoundedCommCodec:
    return ErrorBoundedCommCodec(ErrorBoundPolicy("fixed", bits=bits, **policy_kwargs), block_size=block)


def oracle_bound(x: torch.Tensor, bits: int, block: int) -> np.ndarray:
    """(1 + 2**-6) * max(m / (2Q), 2**-127), m = largest finite |x| of the block; inf at non-finite x."""
    a = x.detach().to(torch.float64).numpy().reshape(-1, block)
    finite = np.isfinite(a)
    m = np.where(finite, np.abs(np.where(finite, a, 0.0)), 0.0).max(axis=1, keepdims=True)
    q = 2 ** (bits - 1) - 1
    bound = np.broadcast_to(np.maximum(m / (2 * q), 2.0**-127) * (1 + SLACK), a.shape).copy()
    bound[~finite] = np.inf
    return bound.reshape(-1)


def oracle_decode(payload: torch.Tensor, bits: int, block: int) -> np.ndarray:
    """Parse the wire format with NumPy: per block [scale][codes], little-endian."""
    raw = payload.numpy().tobytes()
    head = 4 if bits == 16 else 2
    row = head + block * bits // 8
    assert len(raw) % row == 0
    out = []
    for i in range(0, len(raw), row):
        h = raw[i : i + head]
        if bits == 16:
            scale = np.frombuffer(h, dtype="<f4")[0]
        else:  # bfloat16 = the high half of a float32
            scale = (np.frombuffer(h, dtype="<u2").astype(np.uint32) << 16).view(np.float32)[0]
        body = raw[i + head : i + row]
        if bits == 8:
            codes = np.frombuffer(body, dtype=np.int8).astype(np.int64)
        elif bits == 16:
            codes = np.frombuffer(body, dtype="<i2").astype(np.int64)
        else:
            b = np.frombuffer(body, dtype=np.uint8).astype(np.int64)
            codes = np.stack([b & 15, b >> 4], axis=1).reshape(-1) - 8
        sentinel = -(2 ** (bits - 1))
        with np.errstate(over="ignore"):  # q * s may pass FLT_MAX by < 1%: the format clamps it
            vals = np.clip(codes.astype(np.float32) * np.float32(scale), -FLT_MAX, FLT_MAX).astype(np.float32)
        vals[codes == sentinel] = np.nan
        out.append(vals)
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def assert_within_bound(x: torch.Tensor, y: torch.Tensor, bits: int, block: int) -> float:
    """Finite x: |y - x| <= bound; non-finite x: y is NaN. Returns max(error / bound)."""
    xs = x.detach().to(torch.float32).to(torch.float64).numpy().reshape(-1)
    ys = y.to(torch.float64).numpy().reshape(-1)
    bound = oracle_bound(x.to(torch.float32), bits, block)
    finite = np.isfinite(xs)
    assert np.isnan(ys[~finite]).all(), "non-finite inputs must decode to NaN"
    assert np.isfinite(ys[finite]).all(), "finite inputs must decode to finite values"
    err = np.abs(ys[finite] - xs[finite])
    ratio = err / bound[finite]
    assert (ratio <= 1.0).all(), f"bound violated: max error/bound {ratio.max():.6f}"
    return float(ratio.max()) if ratio.size else 0.0


# ----------------------------------------------------------------------------- bounds
@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("block", [2, 8, 32])
def test_bound_random_inputs(bits, block):
    g = torch.Generator().manual_seed(bits * 100 + block)
    worst = 0.0
    for scale in (1e-30, 1e-5, 1.0, 1e4, 1e30):
        x = torch.randn(64 * block, generator=g) * scale
        x[::7] *= 50  # uneven magnitudes inside blocks
        c = codec(bits, block)
        wire = c.encode(x)
        y = c.decode(wire)
        worst = max(worst, assert_within_bound(x, y, bits, block))
        # the codec's decoder equals an independent parser of the documented wire format
        np.testing.assert_array_equal(y.numpy(), oracle_decode(wire, bits, block))
    # the bound is tight (the rounding step really is ~2 * bound): a 1% looser codec would fail
    assert worst > 0.95, worst


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_input_dtypes(dtype):
    x = (torch.randn(256) * 3).to(dtype)
    c = codec(8, 16)
    y = c.decode(c.encode(x))
    assert y.dtype == torch.float32
    assert_within_bound(x, y, 8, 16)


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_adversarial_inputs(bits):
    c = codec(bits, 8)
    tiny = float(np.finfo(np.float32).tiny)  # 2**-126
    cases = {
        "zeros": torch.zeros(32),
        "neg_zeros": -torch.zeros(32),
        "near_flt_max": torch.tensor([FLT_MAX, -FLT_MAX, FLT_MAX * 0.999, 1.0, 0.0, -FLT_MAX * 0.5, 3e38, -3.3e38] * 4),
        "subnormal": torch.tensor([1e-45, -3e-44, 0.0, 1e-40, tiny, -tiny, 5e-39, 1e-42] * 4),
        "mixed_scales": torch.tensor([1e30, 1e-30, -1.0, 0.5, 1e-3, -1e30, 7.0, 0.0] * 4),
        "constant": torch.full((32,), 0.3),
        "nan_inf": torch.tensor([float("nan"), 1.0, float("inf"), -2.0, -float("inf"), 0.25, 3.0, -0.5] * 4),
        "all_nan_block": torch.cat([torch.full((8,), float("nan")), torch.randn(24)]),
        "inf_only_block": torch.cat([torch.tensor([float("inf"), -float("inf")] * 4), torch.randn(24)]),
    }
    for name, x in cases.items():
        wire = c.encode(x)
        y = c.decode(wire)
        assert_within_bound(x, y, bits, 8)
        np.testing.assert_array_equal(y.numpy(), oracle_decode(wire, bits, 8), err_msg=name)
    assert torch.equal(c.decode(c.encode(cases["zeros"])), torch.zeros(32))
    # a NaN does not spoil the rest of its block: the finite values keep the bound of their own maximum
    y = c.decode(c.encode(cases["nan_inf"]))
    assert (
        torch.isnan(y[[0, 2, 4]]).all() and (y[[1, 3, 5, 6, 7]] - cases["nan_inf"][[1, 3, 5, 6, 7]]).abs().max() <= 3.0
    )
    s = c.policy.summary()
    assert s["nonfinite"] == 2 * 12 + 8 + 8 and s["calls"] == len(cases) + 2


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_absolute_bound_and_violation_counter(bits):
    eps = 1e-3
    thr = 2 * (2 ** (bits - 1) - 1) * eps / (1 + SLACK)  # largest block max for which eps is guaranteed
    g = torch.Generator().manual_seed(bits)
    x = torch.rand(40, 16, generator=g) * 2 - 1
    peaks = torch.linspace(0.1, 1.9, 40) * thr
    x = x / x.abs().amax(dim=1, keepdim=True) * peaks.unsqueeze(1)  # block maxima straddle the threshold
    c = codec(bits, 16, schedule=eps)  # fixed width, eps monitored
    y = c.decode(c.encode(x.reshape(-1))).reshape(40, 16)
    inside = x.abs().amax(dim=1) <= thr
    assert 0 < int(inside.sum()) < 40
    err = (y - x).abs()
    assert float(err[inside].max()) <= eps
    assert float(err[~inside].max()) > eps  # beyond the range the absolute bound is (expectedly) lost...
    assert_within_bound(x.reshape(-1), y.reshape(-1), bits, 16)  # ...but the relative bound holds
    s = c.policy.summary()
    assert s["violations"] == int((~inside).sum()) and s["blocks"] == 40
    assert s["max_abs"] == pytest.approx(float(x.abs().max()))
    assert s["max_guaranteed_error"] == pytest.approx(float(x.abs().max()) / (2 * (2 ** (bits - 1) - 1)) * (1 + SLACK))


# ----------------------------------------------------------------------------- sizes and wire dtype
@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("block", [8, 32])
def test_size_accounting_exact(bits, block):
    c = codec(bits, block)
    head = 4 if bits == 16 else 2
    for n in (0, block, 7 * block, 1000 * block):
        want = n // block * (head + block * bits // 8)
        assert c.calc_quantized_size(n) == want
        assert c.calc_quantized_size(n, c.create_context()) == want
        wire = c.encode(torch.randn(n))
        assert wire.dtype == torch.uint8 and wire.dim() == 1 and wire.numel() == want
        assert c.decode(wire).numel() == n
    with pytest.raises(ValueError, match="multiple of block_size"):
        c.calc_quantized_size(block + 1)
    with pytest.raises(ValueError, match="multiple of block_size"):
        c.encode(torch.randn(block + 2))
    with pytest.raises(TypeError, match="uint8"):
        c.decode(torch.zeros(head + block * bits // 8, dtype=torch.int8))


def test_quantized_dtype_is_a_collective_dtype():
    c = codec(8, 16)
    # torchrec's planner reads codecs.forward.quantized_dtype as a property
    assert isinstance(c.quantized_dtype, torch.dtype)
    assert torch.tensor([], dtype=c.quantized_dtype).element_size() == 1
    # NCCL and gloo carry uint8/int8/int32/int64/fp16/bf16/fp32/fp64, not int16
    assert c.quantized_dtype in {
        torch.uint8,
        torch.int8,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
    }


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_splits_are_independent(bits):
    """What torchrec's pooled all-to-all relies on: block-aligned chunks encode/decode independently."""
    c = codec(bits, 8)
    chunks = [torch.randn(8 * k) * (10.0**k) for k in (1, 3, 0, 5)]
    whole = c.encode(torch.cat(chunks))
    parts = [c.encode(ch) for ch in chunks]
    assert torch.equal(whole, torch.cat(parts))
    sizes = [c.calc_quantized_size(ch.numel()) for ch in chunks]
    assert [p.numel() for p in parts] == sizes
    # a receiver decodes the concatenation of chunks from different senders in one call
    received = torch.cat([parts[2], parts[0], parts[3]])
    np.testing.assert_array_equal(
        c.decode(received).numpy(), torch.cat([c.decode(parts[2]), c.decode(parts[0]), c.decode(parts[3])]).numpy()
    )


def test_torchrec_contract_surface():
    c = codec(8, 16)
    ctx = c.create_context()
    assert ctx.bits == 8 and ctx.padded_dim_sum_per_rank is None and ctx.row_dim == 0
    x = torch.randn(6, 32)
    assert c.padded_size(x, [32, 48], 0, ctx) == (32, 0)


# ----------------------------------------------------------------------------- no host sync
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_kernels_compile_fullgraph(bits):
    """fullgraph=True fails on any .item() / data-dependent shape, so this proves there is none."""
    torch._dynamo.reset()
    enc = torch.compile(cc.encode_blocks, fullgraph=True, backend="eager")
    dec = torch.compile(cc.decode_blocks, fullgraph=True, backend="eager")
    x = torch.randn(512)
    x[3] = float("nan")
    wire, absmax, nonfinite = enc(x, bits, 16)
    assert torch.equal(wire, cc.encode_blocks(x, bits, 16)[0])
    assert int(nonfinite) == 1 and absmax.shape == (32,)
    np.testing.assert_array_equal(dec(wire, bits, 16).numpy(), cc.decode_blocks(wire, bits, 16).numpy())


def test_codec_encode_with_stats_compiles_fullgraph():
    torch._dynamo.reset()
    c = codec(8, 16, schedule=1e-2)
    x = torch.randn(1024)
    c.encode(x)  # creates the device counters
    enc = torch.compile(c.encode, fullgraph=True, backend="eager")
    assert torch.equal(enc(x), c.encode(x))
    assert c.policy.summary()["calls"] == 3


def test_codec_compile_option_many_sizes_and_widths(monkeypatch):
    """compile=True: forward/backward/eval lengths, three widths and both grad modes stay within
    dynamo's recompile limit (a fullgraph/static-shape version failed here) and equal eager."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))
    torch._dynamo.reset()
    for bits in (4, 8, 16):
        c = ErrorBoundedCommCodec(ErrorBoundPolicy("fixed", bits=bits), block_size=16, compile=True)
        eager = codec(bits, 16)
        for n in (16 * 3, 16 * 10, 16 * 77, 16 * 1000, 16 * 5, 16 * 4096):
            for grad in (True, False):
                x = torch.randn(n, requires_grad=grad) * 3
                with torch.set_grad_enabled(grad):
                    wire = c.encode(x)
                    assert not wire.requires_grad and torch.equal(wire, eager.encode(x.detach()))
                    assert torch.equal(c.decode(wire), eager.decode(wire))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_cuda_no_host_sync_and_matches_cpu(bits):
    c = codec(bits, 32, schedule=1e-3)
    x = torch.randn(1 << 16) * 4
    x[5] = float("inf")
    want = c.encode(x)
    xc = x.cuda()
    c.encode(xc)  # allocate the counters outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        wire = c.encode(xc)
        y = c.decode(wire)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # same format as on the CPU (bytes may differ only where a quotient rounds differently)
    assert wire.shape == want.shape and (wire.cpu() != want).float().mean() < 1e-3
    assert_within_bound(x, y.cpu(), bits, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_cuda_compile_option_matches_eager(bits):
    """compile=True with the default backend (inductor) on CUDA, over the lengths of forward,
    backward and evaluation calls and both grad modes: the eager codec's format (a byte may differ
    where a quotient rounds the other way) and the error bound."""
    torch._dynamo.reset()
    c = ErrorBoundedCommCodec(ErrorBoundPolicy("fixed", bits=bits), block_size=16, compile=True)
    eager = codec(bits, 16)
    for n in (16 * 10, 16 * 77, 16 * 4096):
        for grad in (True, False):
            x = (torch.randn(n, device="cuda") * 3).requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                wire = c.encode(x)
                want = eager.encode(x.detach())
                assert not wire.requires_grad and wire.shape == want.shape
                assert (wire != want).float().mean() < 1e-3
                assert_within_bound(x.detach().cpu(), c.decode(wire).cpu(), bits, 16)


# ----------------------------------------------------------------------------- policy
def test_bound_schedule():
    assert BoundSchedule(0.1)(10**6) == 0.1
    lin = BoundSchedule(start=1.0, end=0.0 + 0.5, steps=10, kind="linear")
    assert [lin(i) for i in (0, 5, 10, 20)] == [1.0, 0.75, 0.5, 0.5]
    exp = BoundSchedule(start=1e-2, end=1e-4, steps=100, kind="exp")
    assert exp(50) == pytest.approx(1e-3) and exp(200) == pytest.approx(1e-4)
    step = BoundSchedule(start=0.08, end=0.004, steps=3, kind="step")
    assert [step(i) for i in range(5)] == [0.08, 0.08, 0.08, 0.004, 0.004]
    assert BoundSchedule.from_spec({"start": 2.0}).start == 2.0
    with pytest.raises(ValueError):
        BoundSchedule(start=-1.0)
    with pytest.raises(ValueError):
        BoundSchedule(start=1.0, kind="cosine")


def test_relative_mode_schedule_and_logging(caplog):
    # relative bounds of the widths: c/(2Q) = 0.0725 (4), 0.0040 (8), 1.55e-5 (16)
    assert cc.bits_for_relative_bound(0.08) == 4 and cc.bits_for_relative_bound(0.07) == 8
    assert cc.bits_for_relative_bound(1e-3) == 16 and cc.bits_for_relative_bound(1e-9) == 16
    p = ErrorBoundPolicy("rel", schedule={"start": 0.08, "end": 1e-3, "steps": 20, "kind": "exp"}, name="t")
    assert p.bits == 4
    c = ErrorBoundedCommCodec(p, block_size=8)
    ctx = c.create_context()
    with caplog.at_level(logging.INFO, logger="torchrec_tt.distributed.comm_codec"):
        seen = [p.step(i) for i in range(21)]
    assert seen[0] == 4 and seen[-1] == 16 and sorted(set(seen)) == [4, 8, 16]
    assert seen == sorted(seen)  # tighter bound -> never narrower
    assert sum("bits" in r.getMessage() and "->" in r.getMessage() for r in caplog.records) == 2
    assert [h["bits"] for h in p.history] == [4, 8, 16]
    # a context freezes the width of its call: the receiver decodes what the sender encoded
    x = torch.randn(64)
    wire = c.encode(x, ctx)
    assert wire.numel() == c.calc_quantized_size(64, ctx) != c.calc_quantized_size(64)
    assert_within_bound(x, c.decode(wire, ctx), 4, 8)


def test_absolute_mode_controller_picks_narrowest_width():
    eps = 1e-3  # thresholds 2*Q*eps/c: 4 bits 0.0138, 8 bits 0.250, 16 bits 64.5
    p = ErrorBoundPolicy("abs", schedule=eps, interval=2, tolerance=0.01, name="ctl")
    c = ErrorBoundedCommCodec(p, block_size=16)
    assert p.bits == 16  # starts at the widest (safe)
    g = torch.Generator().manual_seed(0)

    def feed(peak: float, outlier_frac: float = 0.0):
        x = torch.rand(4096, 16, generator=g) * 2 - 1
        x = x / x.abs().amax(dim=1, keepdim=True) * peak
        n_out = int(outlier_frac * 4096)
        x[:n_out] *= 100
        c.encode(x.reshape(-1))

    feed(0.01)
    assert p.step(1) == 16  # not a decision step
    assert p.step(2) == 4  # all blocks fit the 4-bit range
    feed(0.2)
    assert p.step(4) == 8
    feed(0.2, outlier_frac=0.005)  # 0.5% of blocks at 20: within the 1% tolerance of 8 bits
    assert p.step(6) == 8
    feed(0.2, outlier_frac=0.05)  # 5% outliers: widen
    assert p.step(8) == 16
    assert p.step(10) == 16  # no data in the window: keep
    assert [h["bits"] for h in p.history] == [16, 4, 8, 16]
    # the counter checks the width and bound in force at encode time, exactly: the controller reacts one
    # window late, so the first 0.2 batch went out at 4 bits (all 4096 blocks above range); at 8 bits
    # (range 0.25) only the outliers were
    s = p.summary()
    assert s["violations"] == 4096 + int(0.005 * 4096) + int(0.05 * 4096)
    # the schedule changes the target: a 10x looser bound lets 8 bits hold the 0.2 blocks... and 4 bits not
    q = ErrorBoundPolicy("abs", schedule={"start": 1e-3, "end": 1e-2, "steps": 2, "kind": "step"}, interval=2)
    c = ErrorBoundedCommCodec(q, block_size=16)
    feed(0.1)
    assert q.step(2) == 4  # eps(2) = 1e-2: the 4-bit range is 0.138


def test_policy_validation():
    with pytest.raises(ValueError, match="needs a schedule"):
        ErrorBoundPolicy("abs")
    with pytest.raises(ValueError, match="mode"):
        ErrorBoundPolicy("zfp")
    with pytest.raises(ValueError, match="bits"):
        ErrorBoundPolicy("fixed", bits=12)
    with pytest.raises(ValueError, match="collect_stats"):
        ErrorBoundPolicy("abs", schedule=1e-3, collect_stats=False)
    with pytest.raises(ValueError, match="block_size"):
        ErrorBoundedCommCodec(block_size=3)


# ----------------------------------------------------------------------------- registries
def test_registry_builder_and_sharders():
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.types import CommOp, NoOpQuantizedCommCodec

    from torchrec_tt.distributed import TTEmbeddingBagCollectionSharder

    cpu = torch.device("cpu")
    reg = get_error_bounded_codecs_registry("eb4", "eb8", block_size=16, device=cpu)
    a2a = reg[CommOp.POOLED_EMBEDDINGS_ALL_TO_ALL.name]
    assert a2a.forward.policy.bits == 4 and a2a.backward.policy.bits == 8 and a2a.forward.block_size == 16
    rs = reg[CommOp.POOLED_EMBEDDINGS_REDUCE_SCATTER.name]
    assert rs.forward.quantized_dtype == torch.float16  # torchrec's additive FP16 codec, not ours
    for sharder in (
        TTEmbeddingBagCollectionSharder(qcomm_codecs_registry=reg),
        EmbeddingBagCollectionSharder(qcomm_codecs_registry=reg),
    ):
        assert sharder.qcomm_codecs_registry is reg
    reg = get_error_bounded_codecs_registry("fp16", None, reduce_scatter=None, device=cpu)
    assert CommOp.POOLED_EMBEDDINGS_REDUCE_SCATTER.name not in reg
    fwd, bwd = (
        reg[CommOp.POOLED_EMBEDDINGS_ALL_TO_ALL.name].forward,
        reg[CommOp.POOLED_EMBEDDINGS_ALL_TO_ALL.name].backward,
    )
    assert fwd.quantized_dtype == torch.float16 and isinstance(bwd, NoOpQuantizedCommCodec)
    reg = get_error_bounded_codecs_registry(
        {"mode": "abs", "schedule": 1e-3}, {"mode": "rel", "schedule": 0.08}, device=cpu
    )
    pols = cc.comm_codec_policies(reg)
    assert [(p.mode, p.name) for p in pols] == [("abs", "a2a_fwd"), ("rel", "a2a_bwd")]
    with pytest.raises(ValueError, match="codec spec"):
        get_error_bounded_codecs_registry("int3", device=cpu)
    with pytest.raises(ValueError, match="reduce_scatter"):
        get_error_bounded_codecs_registry(reduce_scatter="int8", device=cpu)


def test_make_comm_codecs_registry_by_name():
    from torchrec.distributed.types import CommOp

    cpu = torch.device("cpu")
    a2a = CommOp.POOLED_EMBEDDINGS_ALL_TO_ALL.name
    assert make_comm_codecs_registry("none", cpu) is None
    assert make_comm_codecs_registry("fp16", cpu)[a2a].forward.quantized_dtype == torch.float16
    assert make_comm_codecs_registry("bf16", cpu)[a2a].forward.quantized_dtype == torch.float16  # gloo fallback
    for name, bits in (("eb4", 4), ("eb8", 8), ("eb16", 16)):
        reg = make_comm_codecs_registry(name, cpu, embedding_dims=[16, 16])
        assert reg[a2a].forward.policy.bits == bits and reg[a2a].forward.block_size == 16
    assert make_comm_codecs_registry("eb8", cpu, embedding_dims=[128, 64])[a2a].forward.block_size == 32
    assert make_comm_codecs_registry("eb8", cpu, embedding_dims=[12])[a2a].forward.block_size == 4
    assert make_comm_codecs_registry("eb8", cpu, block_size=8)[a2a].forward.block_size == 8
    reg = make_comm_codecs_registry("eb_adaptive", cpu, forward={"schedule": 5e-3})
    f, b = reg[a2a].forward.policy, reg[a2a].backward.policy
    assert (f.mode, f.error_bound, f.interval) == ("abs", 5e-3, cc.EB_ADAPTIVE_DEFAULTS["forward"]["interval"])
    assert b.mode == "rel"
    with pytest.raises(ValueError, match="comm codec must be one of"):
        make_comm_codecs_registry("int8", cpu)


def test_relative_bounds_table():
    # the documented numbers
    assert [round(cc.relative_bound(b), 6) for b in (4, 8, 16)] == [
        round((1 + SLACK) / 14, 6),
        round((1 + SLACK) / 254, 6),
        round((1 + SLACK) / 65534, 6),
    ]
    assert math.isclose(cc.abs_threshold(8, 1e-3), 254e-3 / (1 + SLACK))


# ----------------------------------------------------------------------------- the example's config knob
def test_config_knob(tmp_path):
    from torchrec_tt.training import config as C

    assert C.COMM_CODECS == cc.COMM_CODECS
    assert C.parse_config([]).train.comm_codec == "none"
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  comm_codec: eb4\n  comm_codec_options: {block_size: 8}\n")
    cfg = C.parse_config(["--yaml_config", str(y)])
    assert (cfg.train.comm_codec, cfg.train.comm_codec_options) == ("eb4", {"block_size": 8})
    assert C.parse_config(["--yaml_config", str(y), "--comm-codec", "fp16"]).train.comm_codec == "fp16"
    assert C.parse_config(["--comm_codec", "eb_adaptive"]).train.comm_codec == "eb_adaptive"
    with pytest.raises(ValueError, match="comm_codec must be one of"):
        C.config_from_dict({"comm_codec": "int8"})
