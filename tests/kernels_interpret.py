"""Checks of the Triton kernels (`sae_core.kernels`), run by `tests/test_kernels.py` in a subprocess.

Triton builds its CPU interpreter only when `TRITON_INTERPRET=1` is set before it is imported,
which a pytest process that has already imported triton cannot arrange; so this file is not
collected by a plain `pytest` run (its name does not match `test_*.py`) and is run as
`TRITON_INTERPRET=1 python -m pytest tests/kernels_interpret.py` (CPU, the interpreter), or
`python -m pytest tests/kernels_interpret.py` on a CUDA machine (the compiled kernels).
Shapes are tiny: the interpreter runs every program in Python (about 10 ms each).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("needs TRITON_INTERPRET=1 (set before triton imports) or a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from sae_core import Sae, SaeConfig, kernels, ops  # noqa: E402
from sae_core.decode import decode  # noqa: E402
from sae_core.encode import selected_encode  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
assert kernels.INTERPRET == INTERPRET

# Tolerances against an fp64 reference computed from the same (rounded) inputs: the kernels
# accumulate in fp32 (fp64 for fp64) and round once on the store.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=4e-2),
}
DTYPES = [torch.float32, torch.float16, torch.float64, torch.bfloat16]

# (tokens N, k, latents L, d, indices drawn from range(high)): d not a power of two (24, 100, 300 >
# the BLOCK_D cap of 256 so two d blocks), k = 1, N not a multiple of the token block, latents above `high`
# selected by no token, small `high` for indices repeated across tokens and within a token.
SHAPES = [
    (1, 1, 4, 24, 4),
    (37, 3, 32, 100, 16),
    (40, 5, 8, 24, 8),
    (20, 4, 24, 300, 18),
    (17, 1, 20, 7, 20),
]


def make(N, k, L, d, high, dtype, seed=0, weights_dtype=None):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(high, (N, k), generator=g)
    if k >= 2:
        idx[0, :] = idx[0, 0]  # the same latent in every slot of one token
        idx[-1, 1] = idx[-1, 0]
    w = torch.randn(N, k, generator=g)
    W = torch.randn(L, d, generator=g)
    rows = torch.randn(N, d, generator=g)
    wdt = weights_dtype or dtype
    return idx.to(DEVICE), w.to(DEVICE, wdt), W.to(DEVICE, dtype), rows.to(DEVICE, dtype)


def dense_codes(idx, w, L):
    """The dense `(N, L)` code matrix in fp64 (repeated indices summed)."""
    return torch.zeros(idx.shape[0], L, dtype=torch.float64, device=idx.device).scatter_add_(1, idx, w.double())


def close(actual, expected, dtype):
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype])


def same(actual, expected):
    """Two implementations in the same fp32/fp64 dtype: both rounded, in different orders."""
    tol = 1e-12 if actual.dtype == torch.float64 else 3e-5
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


@pytest.fixture
def calls(monkeypatch):
    """Counts of calls into each kernel wrapper (patched where `ops` looks them up)."""
    counts = {"gather_sum": 0, "gather_dot": 0, "scatter_rows": 0}
    for name in counts:
        fn = getattr(kernels, f"triton_{name}")

        def counted(*args, _fn=fn, _name=name):
            counts[_name] += 1
            return _fn(*args)

        monkeypatch.setattr(kernels, f"triton_{name}", counted)
    return counts


# ------------------------------------------------------------------------ each primitive alone
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-k{}-L{}-d{}-hi{}".format(*s))
def test_gather_sum(shape, dtype):
    N, k, L, d, high = shape
    idx, w, W, _ = make(*shape, dtype)
    out = kernels.triton_gather_sum(idx, w, W)
    assert out.dtype == W.dtype and out.shape == (N, d)
    close(out, dense_codes(idx, w, L) @ W.double(), dtype)
    close(out, ops.torch_gather_sum(idx, w.double(), W.double()), dtype)
    if dtype in (torch.float32, torch.float64):
        same(out, ops.torch_gather_sum(idx, w, W))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-k{}-L{}-d{}-hi{}".format(*s))
def test_gather_dot(shape, dtype):
    N, k, L, d, high = shape
    idx, _, W, rows = make(*shape, dtype)
    out = kernels.triton_gather_dot(idx, W, rows)
    assert out.dtype == W.dtype and out.shape == (N, k)
    close(out, (rows.double() @ W.double().T).gather(1, idx), dtype)
    close(out, ops.torch_gather_dot(idx, W.double(), rows.double()), dtype)
    if dtype in (torch.float32, torch.float64):
        same(out, ops.torch_gather_dot(idx, W, rows))


# (rows dtype, weights dtype): the callers pass fp32 (fp64 for fp64) weights; others work too
SCATTER_DTYPES = [(dt, torch.float64 if dt == torch.float64 else torch.float32) for dt in DTYPES]
SCATTER_DTYPES += [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)]


@pytest.mark.parametrize("dtype,wdt", SCATTER_DTYPES, ids=lambda dt: str(dt)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-k{}-L{}-d{}-hi{}".format(*s))
def test_scatter_rows(shape, dtype, wdt):
    N, k, L, d, high = shape
    idx, w, _, rows = make(*shape, dtype, weights_dtype=wdt)
    out = kernels.triton_scatter_rows(idx, w, rows, L)
    assert out.dtype == wdt and out.shape == (L, d)
    expected = dense_codes(idx, w, L).T @ rows.double()
    # rows are cast to fp32 on load: the only rounding is the output's
    close(out, expected, wdt)
    close(out, ops.torch_scatter_rows(idx, w.double(), rows.double(), L), wdt)
    if wdt in (torch.float32, torch.float64):
        same(out, ops.torch_scatter_rows(idx, w, rows, L))
    unused = torch.ones(L, dtype=torch.bool, device=DEVICE)
    unused[idx.reshape(-1)] = False
    assert unused[high:].all()
    assert (out[unused] == 0).all()  # latents no token selects: exact zeros


def test_small_blocks(monkeypatch):
    """Several d blocks, several k blocks and long segments, each with a masked tail."""
    for op, tiles in kernels.TILES.items():
        monkeypatch.setitem(kernels.TILES, op, {**tiles, "BLOCK_D": 16} | ({"BLOCK_K": 16} if "BLOCK_K" in tiles else {}))
    N, k, L, d = 21, 19, 6, 40  # k > gather_dot's BLOCK_K; ~70 entries per latent > scatter_rows' BLOCK_S
    idx, w, W, rows = make(N, k, L, d, L, torch.float32)
    Z = dense_codes(idx, w, L)
    close(kernels.triton_gather_sum(idx, w, W), Z @ W.double(), torch.float32)
    close(kernels.triton_gather_dot(idx, W, rows), (rows.double() @ W.double().T).gather(1, idx), torch.float32)
    close(kernels.triton_scatter_rows(idx, w, rows, L), Z.T @ rows.double(), torch.float32)


@pytest.mark.parametrize("chunk", [1, 3, 16])
@pytest.mark.parametrize("wdt", [torch.float32, torch.float64, torch.float16], ids=lambda dt: str(dt)[6:])
def test_scatter_rows_splits_long_segments(monkeypatch, chunk, wdt):
    """A latent selected by many tokens is summed in pieces of SEGMENT_CHUNK entries, then added in order."""
    monkeypatch.setattr(kernels, "SEGMENT_CHUNK", chunk)
    N, k, L, d = 26, 3, 9, 20
    idx, w, _, rows = make(N, k, L, d, 4, torch.float32, weights_dtype=wdt)
    idx[:, 0] = 6  # latent 6 in every token (26 entries), latents 0-3 in about 13 each, 4, 5, 7, 8 in none
    idx[:, 1] = torch.where(idx[:, 1] == 6, 5, idx[:, 1])
    idx[3, 2] = 8  # latent 8 in one token: a single piece among split ones
    out = kernels.triton_scatter_rows(idx, w, rows, L)
    expected = dense_codes(idx, w, L).T @ rows.double()
    # fp16 output: the first piece is rounded before the others are added to it
    close(out, expected, wdt) if wdt != torch.float16 else torch.testing.assert_close(
        out.double(), expected, rtol=4e-3, atol=1e-2)
    assert (out[[4, 5, 7]] == 0).all()
    assert torch.equal(out, kernels.triton_scatter_rows(idx, w, rows, L))  # deterministic
    if wdt == torch.float64:
        same(out, ops.torch_scatter_rows(idx, w, rows.double(), L))


def test_scatter_rows_pieces_grow_to_bound_the_buffer(monkeypatch):
    """Where tokens x k / SEGMENT_CHUNK rows of partial sums would pass PARTIAL_ELEMENTS, pieces grow."""
    N, k, L, d = 24, 2, 5, 20
    idx, w, _, rows = make(N, k, L, d, 3, torch.float32)
    monkeypatch.setattr(kernels, "SEGMENT_CHUNK", 2)
    monkeypatch.setattr(kernels, "PARTIAL_ELEMENTS", 4 * d)  # room for 4 pieces of 12 entries, not 24 of 2
    seen = []
    real = kernels._extra_chunks
    monkeypatch.setattr(kernels, "_extra_chunks", lambda seg, n, c: seen.append(c) or real(seg, n, c))
    close(kernels.triton_scatter_rows(idx, w, rows, L), dense_codes(idx, w, L).T @ rows.double(), torch.float32)
    assert seen == [12]


def test_extra_chunks_index_the_pieces():
    """Which program sums which piece of which latent's segment (segments of 0, 5, 1, 0, 7 entries, pieces of 2)."""
    lengths = torch.tensor([0, 5, 1, 0, 7])
    segments = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(DEVICE)
    owner, chunk, count = kernels._extra_chunks(segments, int(lengths.sum()), 2)
    # latent 1: pieces 1, 2 after the first; latent 4: pieces 1, 2, 3; 13 // 2 = 6 slots, one unused
    assert owner.tolist() == [1, 1, 4, 4, 4, 5]
    assert chunk.tolist() == [1, 2, 1, 2, 3, 0]
    assert count.tolist() == [2, 0, 3, 0, 0, 0]
    owner, chunk, count = kernels._extra_chunks(segments, int(lengths.sum()), 512)
    assert owner.numel() == chunk.numel() == count.numel() == 0


def test_strided_and_int32_inputs():
    N, k, L, d = 19, 3, 12, 24
    idx, w, W, rows = make(N, k, L, d, L, torch.float32)
    W_wide = torch.randn(L, d + 5, device=DEVICE)
    W_wide[:, :d] = W
    rows_wide = torch.randn(N, 2 * d, device=DEVICE)
    rows_wide[:, ::2] = rows
    idx_wide = torch.stack([idx, idx], -1).reshape(N, 2 * k)[:, ::2]  # non-contiguous
    w_t = w.T.contiguous().T
    assert not idx_wide.is_contiguous() and not w_t.is_contiguous()
    Z = dense_codes(idx, w, L)
    for ix in (idx_wide, idx.to(torch.int32)):
        close(kernels.triton_gather_sum(ix, w_t, W_wide[:, :d]), Z @ W.double(), torch.float32)
        close(
            kernels.triton_gather_dot(ix, W_wide[:, :d], rows_wide[:, ::2]),
            (rows.double() @ W.double().T).gather(1, idx),
            torch.float32,
        )
        close(kernels.triton_scatter_rows(ix, w_t, rows_wide[:, ::2], L), Z.T @ rows.double(), torch.float32)


def test_empty():
    W = torch.randn(5, 7, device=DEVICE)
    for N, k in ((0, 3), (4, 0)):
        idx = torch.zeros(N, k, dtype=torch.long, device=DEVICE)
        w = torch.ones(N, k, device=DEVICE)
        rows = torch.randn(N, 7, device=DEVICE)
        assert torch.equal(kernels.triton_gather_sum(idx, w, W), torch.zeros(N, 7, device=DEVICE))
        assert kernels.triton_gather_dot(idx, W, rows).shape == (N, k)
        assert torch.equal(kernels.triton_scatter_rows(idx, w, rows, 5), torch.zeros(5, 7, device=DEVICE))


def test_shape_errors():
    idx = torch.zeros(3, 2, dtype=torch.long, device=DEVICE)
    W = torch.randn(4, 5, device=DEVICE)
    with pytest.raises(ValueError):
        kernels.triton_gather_sum(idx, torch.ones(3, 3, device=DEVICE), W)
    with pytest.raises(ValueError):
        kernels.triton_gather_dot(idx, W, torch.ones(3, 4, device=DEVICE))
    with pytest.raises(ValueError):
        kernels.triton_scatter_rows(idx, torch.ones(3, 2, device=DEVICE), torch.ones(2, 5, device=DEVICE), 4)


def test_dispatch(monkeypatch, calls):
    idx, w, W, rows = make(5, 2, 6, 8, 6, torch.float32)
    monkeypatch.setenv("SAE_CORE_KERNELS", "triton")
    ops.gather_sum(idx, w, W)
    ops.gather_dot(idx, W, rows)
    ops.scatter_rows(idx, w, rows, 6)
    assert calls == {"gather_sum": 1, "gather_dot": 1, "scatter_rows": 1}
    monkeypatch.setenv("SAE_CORE_KERNELS", "torch")
    ops.gather_sum(idx, w, W)
    assert calls["gather_sum"] == 1


# ------------------------------------------------------------------- autograd through them
def test_gradcheck_decode(monkeypatch, calls):
    monkeypatch.setenv("SAE_CORE_KERNELS", "triton")
    g = torch.Generator().manual_seed(1)
    idx = torch.tensor([[0, 3, 3], [5, 1, 0], [2, 2, 2], [1, 4, 0]], device=DEVICE).reshape(2, 2, 3)
    acts = torch.rand(2, 2, 3, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    W = torch.randn(6, 4, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, w: decode(idx, a, w), (acts, W))
    assert all(n > 0 for n in calls.values()), calls


def test_gradcheck_selected_encode(monkeypatch, calls):
    monkeypatch.setenv("SAE_CORE_KERNELS", "triton")
    g = torch.Generator().manual_seed(2)
    N, L, d = 4, 6, 5  # k = 3
    idx = torch.tensor([[0, 3, 5], [5, 1, 0], [2, 4, 1], [1, 4, 0]], device=DEVICE)
    x = (0.1 * torch.randn(N, d, generator=g, dtype=torch.float64)).to(DEVICE).requires_grad_()
    W = (0.1 * torch.randn(L, d, generator=g, dtype=torch.float64)).to(DEVICE).requires_grad_()
    # pre-activations at least 0.5 from ReLU's kink: latents 1 and 4 are off, the rest on
    b = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 1.0], dtype=torch.float64, device=DEVICE).requires_grad_()

    def f(x, W, b):
        with torch.no_grad():  # the forward values, as Sae computes them (without autograd)
            values = torch.relu(torch.einsum("nd,nkd->nk", x, W[idx]) + b[idx])
        return selected_encode(x, W, b, idx, values)

    assert torch.autograd.gradcheck(f, (x, W, b))
    assert calls["gather_sum"] > 0 and calls["scatter_rows"] > 0, calls


def _train_steps(sae, x, dead, steps=1, autocast=False):
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    outs, grads = [], []
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = sae(x, dead_mask=dead)
            loss = out.fvu + out.auxk_loss / 32
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
        outs.append(out)
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
    return outs, grads, {n: p.detach().clone() for n, p in sae.named_parameters()}


def _normwise_close(actual, expected, tol, what):
    actual, expected = actual.detach().double(), expected.detach().double()
    err = float((actual - expected).norm() / expected.norm().clamp_min(1e-12))
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol}"


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast"])
@pytest.mark.parametrize("auxk", ["dense", "sparse"])
def test_sae_training_step_matches_torch(monkeypatch, calls, auxk, autocast):
    """A training step through the kernels equals the step through the torch reference; under bf16
    autocast (the gathers read bf16 copies of the weights) to bf16 accuracy."""
    import sae_core.sae

    # AuxK dense over the dead latents (the default here) or through the kernels like the main top-k.
    ratio = 10**9 if auxk == "dense" else 0
    monkeypatch.setattr(sae_core.sae, "AUXK_DENSE_RATIO", {DEVICE: ratio})
    torch.manual_seed(0)
    sae = Sae(24, SaeConfig(expansion_factor=4, k=3), device=DEVICE)
    x = torch.randn(16, 24, device=DEVICE)
    dead = torch.zeros(sae.num_latents, dtype=torch.bool, device=DEVICE)
    dead[::3] = True  # 32 dead latents: AuxK runs (k_aux = 12)

    monkeypatch.setenv("SAE_CORE_KERNELS", "torch")
    ref = _train_steps(copy.deepcopy(sae), x, dead, autocast=autocast)
    assert sum(calls.values()) == 0
    monkeypatch.setenv("SAE_CORE_KERNELS", "triton")
    got = _train_steps(copy.deepcopy(sae), x, dead, autocast=autocast)
    # Per step: decoder forward and encoder backward to x (gather_sum), decoder backward (gather_dot,
    # scatter_rows), encoder backward to W_enc (scatter_rows); twice as many with sparse AuxK.
    per_step = {"gather_sum": 2, "gather_dot": 1, "scatter_rows": 2}
    assert calls == {op: n * (2 if auxk == "sparse" else 1) for op, n in per_step.items()}, calls

    if autocast:
        # bf16 results rounded in different places (the interpreter truncates bf16 stores): compare
        # normwise; the Adam step moves every parameter by about lr whatever the gradient's size.
        (o_ref,), (o_got,) = ref[0], got[0]
        assert o_ref.auxk_loss > 0
        assert torch.equal(o_got.latent_indices, o_ref.latent_indices)
        for field in ("sae_out", "latent_acts", "fvu", "auxk_loss"):
            _normwise_close(getattr(o_got, field), getattr(o_ref, field), 3e-2, field)
        for name, g in ref[1][0].items():
            assert got[1][0][name].dtype == torch.float32
            _normwise_close(got[1][0][name], g, 3e-2, f"grad {name}")
        for name, p in ref[2].items():
            torch.testing.assert_close(got[2][name], p, rtol=0, atol=2.5e-3)
        return
    for o_ref, o_got in zip(ref[0], got[0], strict=True):
        assert o_ref.auxk_loss > 0
        for a, b in zip(o_ref, o_got, strict=True):
            torch.testing.assert_close(b, a)
    for g_ref, g_got in zip(ref[1], got[1], strict=True):
        for name in g_ref:
            torch.testing.assert_close(g_got[name], g_ref[name], msg=lambda m, n=name: f"grad {n}: {m}")
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], msg=lambda m, n=name: f"param {n}: {m}")


# ------------------------------------------------------------------- the GPU benchmark, tiny
def test_kernel_benchmark_sections_run(monkeypatch, capsys):
    """benchmarks/kernels.py's sections run end to end on a tiny shape, so a GPU session's run of it
    fails on nothing but the GPU (it was written on a machine without one)."""
    from benchmarks import kernels as bench

    monkeypatch.setattr(bench, "DEVICE", DEVICE)
    monkeypatch.setitem(bench.SHAPES, "tiny", dict(d=24, latents=64, k=4))
    args = bench.parse_args(["--shapes", "tiny", "--min-time", "0", "--train-steps", "1", "--train-warmup", "1",
                             "--dead-frac", "0.5"])
    report = bench.Report(args)
    cfg, tokens = bench.SHAPES["tiny"], 20
    for dtype in (torch.bfloat16, torch.float32):
        bench.check(report, "tiny", cfg, tokens, dtype, args)
        bench.primitives(report, "tiny", cfg, tokens, dtype, args)
    bench.train(report, "tiny", cfg, tokens, args, bench.load_sparsify())
    assert report.failures == []
    kinds = {(r["kind"], r.get("op"), r.get("impl")) for r in report.records}
    for op in ("gather_sum", "gather_dot", "scatter_rows"):
        assert ("check", op, None) in kinds
        for impl in ("triton", "torch", "dense"):
            assert ("primitive", op, impl) in kinds
    assert {r["dead"] for r in report.records if r["kind"] == "train"} == {"0 dead latents", "32 dead latents"}
    assert all(r["tokens_per_s"] > 0 for r in report.records if r["kind"] == "train")
    assert ("primitive", "scatter_rows skew 1", "triton") in kinds  # the straggler case, split
    assert ("primitive", "scatter_rows skew 1", "whole") in kinds  # and summed whole
    assert "decoder fwd+bwd" in capsys.readouterr().out


def test_tile_sweep_runs_and_restores_the_defaults(monkeypatch, capsys):
    """benchmarks/kernels_tune.py times every candidate tiling (each one computing the right result)."""
    from benchmarks import kernels as bench
    from benchmarks import kernels_tune

    monkeypatch.setattr(bench, "DEVICE", DEVICE)
    defaults, chunk = {op: dict(t) for op, t in kernels.TILES.items()}, kernels.SEGMENT_CHUNK
    monkeypatch.setattr(kernels_tune, "CHUNKS", [2, 8])  # segments of ~20 entries: split
    args = kernels_tune.parse_args(["--dtypes", "fp32", "--min-time", "0"])
    records = kernels_tune.tune(dict(d=24, latents=32, k=3), 20, "fp32", args)
    assert kernels.TILES == defaults and kernels.SEGMENT_CHUNK == chunk
    for op, candidates in kernels_tune.CANDIDATES.items():
        tried = [r["tiling"] for r in records if r["op"] == op]
        assert defaults[op] in tried and all(c in tried for c in candidates)
        assert all(r["ms"] > 0 for r in records)
    out = capsys.readouterr().out
    assert out.count("best: TILES[") == 3 and out.count("best: SEGMENT_CHUNK = ") == 1
    assert {r["tiling"]["SEGMENT_CHUNK"] for r in records if "SEGMENT_CHUNK" in r["tiling"]} == {
        kernels.SEGMENT_CHUNK, *kernels_tune.CHUNKS}

    # Each candidate gives the reference's result (its masks cover tiles wider than d and k).
    idx, w, W, rows = make(20, 3, 32, 24, 32, torch.float32)
    for tiles in kernels_tune.CANDIDATES["gather_sum"]:
        monkeypatch.setitem(kernels.TILES, "gather_sum", tiles)
        same(kernels.triton_gather_sum(idx, w, W), ops.torch_gather_sum(idx, w, W))
    for tiles in kernels_tune.CANDIDATES["gather_dot"]:
        monkeypatch.setitem(kernels.TILES, "gather_dot", tiles)
        same(kernels.triton_gather_dot(idx, W, rows), ops.torch_gather_dot(idx, W, rows))
    for tiles in kernels_tune.CANDIDATES["scatter_rows"]:
        monkeypatch.setitem(kernels.TILES, "scatter_rows", tiles)
        same(kernels.triton_scatter_rows(idx, w, rows, 32), ops.torch_scatter_rows(idx, w, rows, 32))
