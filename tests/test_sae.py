"""The TopK SAE against an independent dense reference written here (float64 where possible).

Nothing below calls the library to compute expected values: the reference builds the dense
`(tokens, num_latents)` latent matrix by thresholding the pre-activations at their k-th largest
value and decodes it with a plain matmul.
"""

from __future__ import annotations

import pytest
import torch

from sae_core import Sae, SaeConfig
from sae_core.decode import eager_decode

D_IN = 16
NUM_LATENTS = 64
K = 4
F64 = torch.float64


# --------------------------------------------------------------------------- dense reference
def ref_pre_acts(x, W_enc, b_enc, b_dec):
    return torch.relu((x - b_dec) @ W_enc.T + b_enc)


def ref_dense_topk(pre, k, allowed=None):
    """Dense `pre` with everything but the k largest entries per row (among `allowed`) zeroed.

    Thresholds at the k-th largest value instead of scattering topk indices; ties at zero only
    add zero entries, so the result is the same dense vector whichever zeros a top-k picks.
    """
    masked = pre if allowed is None else torch.where(allowed, pre, torch.full_like(pre, -torch.inf))
    kth = masked.sort(dim=-1, descending=True).values[..., k - 1 : k]
    keep = masked >= kth
    return pre * keep.to(pre.dtype)


def ref_forward(x, W_enc, b_enc, W_dec, b_dec, k, dead_mask=None, multi_topk=False):
    """Returns (x_hat, fvu, auxk, multi_fvu) for x of shape (n, d_in)."""
    pre = ref_pre_acts(x, W_enc, b_enc, b_dec)
    z = ref_dense_topk(pre, k)
    x_hat = z @ W_dec + b_dec
    total_variance = ((x - x.mean(0)) ** 2).sum()
    fvu = ((x - x_hat) ** 2).sum() / total_variance

    auxk = torch.zeros((), dtype=x.dtype)
    if dead_mask is not None and int(dead_mask.sum()) > 0:
        num_dead = int(dead_mask.sum())
        k_aux = x.shape[-1] // 2
        scale = min(num_dead / k_aux, 1.0)
        z_aux = ref_dense_topk(pre, min(k_aux, num_dead), allowed=dead_mask.expand_as(pre))
        e_hat = z_aux @ W_dec  # no b_dec
        target = (x - x_hat).detach()
        auxk = scale * ((e_hat - target) ** 2).sum() / total_variance

    multi_fvu = torch.zeros((), dtype=x.dtype)
    if multi_topk:
        z4 = ref_dense_topk(pre, min(4 * k, pre.shape[-1]))
        multi_fvu = ((x - (z4 @ W_dec + b_dec)) ** 2).sum() / total_variance
    return x_hat, fvu, auxk, multi_fvu


def make_sae(dtype=F64, seed=0, **cfg_kw):
    cfg_kw = {"num_latents": NUM_LATENTS, "k": K, **cfg_kw}
    torch.manual_seed(seed)
    sae = Sae(D_IN, SaeConfig(**cfg_kw), dtype=dtype)
    with torch.no_grad():
        # Independent encoder and decoder, non-zero biases: every parameter must matter.
        sae.encoder.weight.normal_(0, D_IN**-0.5)
        sae.encoder.bias.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.5)
    return sae


def params(sae):
    return sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec


def rand_x(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, D_IN, generator=g, dtype=F64)


# ------------------------------------------------------------------------------------ encode
@pytest.mark.parametrize("shape", [(20,), (3, 5)])
def test_encode_matches_dense_topk(shape):
    sae = make_sae()
    x = rand_x(*shape)
    top_acts, top_indices = sae.encode(x)
    assert top_acts.shape == (*shape, K) and top_indices.shape == (*shape, K)

    W_enc, b_enc, _, b_dec = (p.detach() for p in params(sae))
    pre = ref_pre_acts(x, W_enc, b_enc, b_dec).reshape(-1, NUM_LATENTS)
    # The check is only meaningful without ties: every token has more than k positive latents.
    assert ((pre > 0).sum(-1) > K).all()
    order = pre.argsort(dim=-1, descending=True)[:, :K]
    ref_vals = pre.gather(-1, order)

    acts = top_acts.detach().reshape(-1, K)
    idx = top_indices.reshape(-1, K)
    torch.testing.assert_close(
        acts.sort(-1, descending=True).values, ref_vals, rtol=1e-12, atol=1e-12
    )
    for row_lib, row_ref in zip(idx.tolist(), order.tolist(), strict=True):
        assert set(row_lib) == set(row_ref)
    # The activations belong to the indices they come with.
    torch.testing.assert_close(acts, pre.gather(-1, idx), rtol=1e-12, atol=1e-12)


def test_biases_matter():
    """Guard for the reference tests: dropping b_dec or b_enc changes the top-k."""
    sae = make_sae()
    x = rand_x(20)
    W_enc, b_enc, _, b_dec = (p.detach() for p in params(sae))
    full = ref_pre_acts(x, W_enc, b_enc, b_dec)
    assert not torch.allclose(full, ref_pre_acts(x, W_enc, b_enc, torch.zeros_like(b_dec)))
    assert not torch.allclose(full, ref_pre_acts(x, W_enc, torch.zeros_like(b_enc), b_dec))


# ------------------------------------------------------------------------------------ decode
@pytest.mark.parametrize("lead", [(7,), (2, 3)])
def test_decode_matches_dense(lead):
    sae = make_sae()
    g = torch.Generator().manual_seed(2)
    n = 1
    for s in lead:
        n *= s
    idx = torch.stack([torch.randperm(NUM_LATENTS, generator=g)[:K] for _ in range(n)])
    acts = torch.rand(n, K, generator=g, dtype=F64)
    out = sae.decode(acts.reshape(*lead, K), idx.reshape(*lead, K))
    assert out.shape == (*lead, D_IN)

    z = torch.zeros(n, NUM_LATENTS, dtype=F64)
    for t in range(n):
        for j in range(K):
            z[t, idx[t, j]] = acts[t, j]
    ref = z @ sae.W_dec.detach() + sae.b_dec.detach()
    torch.testing.assert_close(out.detach().reshape(n, D_IN), ref, rtol=1e-12, atol=1e-12)


def test_eager_decode_duplicates_and_leading_dims():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(10, 5, generator=g, dtype=F64)
    idx = torch.tensor([[[1, 1, 3]], [[0, 9, 0]]])  # (2, 1, 3), repeated indices add up
    acts = torch.rand(2, 1, 3, generator=g, dtype=F64)
    out = eager_decode(idx, acts, W)
    assert out.shape == (2, 1, 5)
    ref = torch.stack(
        [sum(acts[b, 0, j] * W[idx[b, 0, j]] for j in range(3)) for b in range(2)]
    ).unsqueeze(1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_eager_decode_gradcheck():
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 12, (2, 3, 4), generator=g)
    acts = torch.rand(2, 3, 4, generator=g, dtype=F64, requires_grad=True)
    W = torch.randn(12, 5, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: eager_decode(idx, a, w), (acts, W))


# ----------------------------------------------------------------------------------- forward
def dead_mask_with(num_dead, seed=5):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(NUM_LATENTS, dtype=torch.bool)
    mask[torch.randperm(NUM_LATENTS, generator=g)[:num_dead]] = True
    return mask


@pytest.fixture(params=["dense", "sparse"])
def auxk_path(request, monkeypatch):
    """Both ways Sae computes AuxK: dense over the dead latents, or sparse products (many dead)."""
    import sae_core.sae

    ratio = 10**9 if request.param == "dense" else 0
    monkeypatch.setattr(sae_core.sae, "AUXK_DENSE_RATIO", {"cpu": ratio, "cuda": ratio})
    return request.param


@pytest.mark.parametrize("num_dead", [3, 8, 30])  # k_aux = 8: scale < 1, == 1, capped at 1
def test_forward_matches_reference(num_dead, auxk_path):
    sae = make_sae()
    x = rand_x(40)
    dead = dead_mask_with(num_dead)
    out = sae(x, dead_mask=dead)
    x_hat, fvu, auxk, _ = ref_forward(x, *(p.detach() for p in params(sae)), K, dead_mask=dead)

    torch.testing.assert_close(out.sae_out.detach(), x_hat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.fvu.detach(), fvu, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.auxk_loss.detach(), auxk, rtol=1e-12, atol=0)
    assert auxk > 0
    assert out.multi_topk_fvu.item() == 0.0
    # The selected latents reconstruct x: sae_out == decode of the returned latents.
    z = torch.zeros(40, NUM_LATENTS, dtype=F64).scatter(
        -1, out.latent_indices, out.latent_acts.detach()
    )
    torch.testing.assert_close(
        z @ sae.W_dec.detach() + sae.b_dec.detach(), x_hat, rtol=1e-12, atol=1e-12
    )


def test_auxk_scale_is_num_dead_over_k_aux(auxk_path):
    """With one dead latent, the loss is (1 / k_aux) * ||a w - r||^2 / total_variance."""
    sae = make_sae()
    x = rand_x(40)
    dead = torch.zeros(NUM_LATENTS, dtype=torch.bool)
    dead[5] = True
    out = sae(x, dead_mask=dead)
    W_enc, b_enc, W_dec, b_dec = (p.detach() for p in params(sae))
    a = torch.relu((x - b_dec) @ W_enc[5] + b_enc[5])  # (n,)
    r = x - out.sae_out.detach()
    tv = ((x - x.mean(0)) ** 2).sum()
    expected = (1 / (D_IN // 2)) * ((a[:, None] * W_dec[5] - r) ** 2).sum() / tv
    torch.testing.assert_close(out.auxk_loss.detach(), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dead", [None, torch.zeros(NUM_LATENTS, dtype=torch.bool)])
def test_auxk_zero_without_dead_latents(dead):
    sae = make_sae()
    out = sae(rand_x(10), dead_mask=dead)
    assert out.auxk_loss.item() == 0.0
    assert out.fvu.item() > 0


@pytest.mark.parametrize("k", [K, 20])  # 4 * 20 > 64 latents: capped at all latents
def test_multi_topk(k):
    sae = make_sae(k=k, multi_topk=True)
    x = rand_x(30)
    out = sae(x)
    _, fvu, _, multi = ref_forward(x, *(p.detach() for p in params(sae)), k, multi_topk=True)
    torch.testing.assert_close(out.fvu.detach(), fvu, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.multi_topk_fvu.detach(), multi, rtol=1e-12, atol=0)
    assert multi > 0 and multi != fvu


def test_forward_leading_dims(auxk_path):
    sae = make_sae()
    x = rand_x(3, 5)
    dead = dead_mask_with(10)
    out = sae(x, dead_mask=dead)
    assert out.sae_out.shape == (3, 5, D_IN)
    assert out.latent_acts.shape == (3, 5, K)
    assert out.latent_indices.shape == (3, 5, K)
    assert out.fvu.shape == out.auxk_loss.shape == out.multi_topk_fvu.shape == ()
    x_hat, fvu, auxk, _ = ref_forward(
        x.reshape(15, D_IN), *(p.detach() for p in params(sae)), K, dead_mask=dead
    )
    torch.testing.assert_close(
        out.sae_out.detach().reshape(15, D_IN), x_hat, rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(out.fvu.detach(), fvu, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.auxk_loss.detach(), auxk, rtol=1e-12, atol=0)


def test_forward_d_in_one_with_dead_latents(auxk_path):
    """d_in // 2 == 0 must not divide by zero."""
    sae = Sae(1, SaeConfig(num_latents=4, k=1), dtype=F64)
    out = sae(torch.randn(6, 1, dtype=F64), dead_mask=torch.ones(4, dtype=torch.bool))
    assert torch.isfinite(out.auxk_loss)


# ------------------------------------------------------------------------------ autocast
@pytest.mark.parametrize("multi_topk", [False, True])
def test_autocast_gathers_read_low_precision_copies(monkeypatch, auxk_path, multi_topk):
    """Under autocast the sparse products gather bf16 copies of the weights; the losses and the
    (fp32) gradients stay those of the same step gathering the fp32 weights, to bf16 accuracy."""
    import sae_core.sae
    from sae_core import ops

    seen = []
    for name in ("gather_sum", "gather_dot"):
        fn = getattr(ops, name)
        W_arg = 2 if name == "gather_sum" else 1

        def spy(*a, _fn=fn, _i=W_arg):
            seen.append(a[_i].dtype)
            return _fn(*a)

        monkeypatch.setattr(ops, name, spy)
    x = rand_x(48).float()
    dead = dead_mask_with(12)

    def step(autocast_gathers):
        monkeypatch.setattr(sae_core.sae, "AUTOCAST_GATHERS", autocast_gathers)
        sae = make_sae(dtype=torch.float32, multi_topk=multi_topk)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sae(x, dead_mask=dead)
            (out.fvu + out.auxk_loss + out.multi_topk_fvu).backward()
        return out, {n: p.grad for n, p in sae.named_parameters()}, set(seen)

    out_lo, grads_lo, dtypes_lo = step(True)
    out_hi, grads_hi, dtypes_hi = step(False)
    assert dtypes_lo == {torch.bfloat16} and dtypes_hi == {torch.float32}
    for name, g in grads_lo.items():
        assert g.dtype == torch.float32, name
        assert (g - grads_hi[name]).norm() <= 3e-2 * grads_hi[name].norm(), name
    for a, b in [(out_lo.fvu, out_hi.fvu), (out_lo.auxk_loss, out_hi.auxk_loss), (out_lo.multi_topk_fvu, out_hi.multi_topk_fvu)]:
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=1e-6)
    torch.testing.assert_close(out_lo.latent_indices, out_hi.latent_indices)


def test_no_copies_without_autocast_or_in_low_precision():
    sae = make_sae(dtype=torch.float32)
    assert sae._reads() == (None, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reads = sae._reads()
        assert reads.W_enc.dtype == reads.W_dec.dtype == torch.bfloat16
        assert make_sae(dtype=torch.bfloat16)._reads() == (None, None)  # already bf16: nothing to copy


# --------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("num_dead", [0, 3, 30])
def test_gradients_match_dense_reference(num_dead, auxk_path):
    sae = make_sae()
    x = rand_x(3, 8)
    dead = dead_mask_with(num_dead) if num_dead else None
    out = sae(x, dead_mask=dead)
    (out.fvu + out.auxk_loss).backward()
    lib_grads = [p.grad.clone() for p in params(sae)]

    ref_params = [p.detach().clone().requires_grad_(True) for p in params(sae)]
    _, fvu, auxk, _ = ref_forward(x.reshape(-1, D_IN), *ref_params, K, dead_mask=dead)
    (fvu + auxk).backward()
    for name, got, ref in zip(
        ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], lib_grads, ref_params, strict=True
    ):
        assert ref.grad.abs().max() > 0, name
        torch.testing.assert_close(got, ref.grad, rtol=1e-10, atol=1e-12, msg=name)


# ----------------------------------------------------------------------------- decoder norm
def test_decoder_init():
    torch.manual_seed(0)
    sae = Sae(D_IN, SaeConfig(num_latents=NUM_LATENTS, k=K))
    assert sae.W_dec.shape == sae.encoder.weight.shape == (NUM_LATENTS, D_IN)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(NUM_LATENTS), rtol=0, atol=1e-5)
    assert torch.equal(sae.encoder.weight, sae.W_dec)
    assert sae.encoder.weight.data_ptr() != sae.W_dec.data_ptr()  # tied at init, not shared
    assert not sae.encoder.bias.any() and not sae.b_dec.any()
    assert all(p.requires_grad for p in sae.parameters())


def test_expansion_factor_gives_num_latents():
    sae = Sae(8, SaeConfig(expansion_factor=3, k=2))
    assert sae.num_latents == 24 and sae.W_dec.shape == (24, 8)


def test_remove_gradient_parallel_to_decoder_directions():
    sae = make_sae()
    g = torch.randn(NUM_LATENTS, D_IN, dtype=F64)
    sae.W_dec.grad = g.clone()
    sae.remove_gradient_parallel_to_decoder_directions()
    W = sae.W_dec.detach()
    dots = (sae.W_dec.grad * W).sum(dim=1)
    torch.testing.assert_close(dots, torch.zeros_like(dots), rtol=0, atol=1e-12)
    ref = g - (g * W).sum(1, keepdim=True) * W  # rows of W are unit norm
    torch.testing.assert_close(sae.W_dec.grad, ref, rtol=1e-12, atol=1e-12)


def test_set_decoder_norm_to_unit_norm():
    sae = make_sae()
    scales = torch.rand(NUM_LATENTS, 1, dtype=F64) * 5 + 0.1
    with torch.no_grad():
        sae.W_dec.mul_(scales)
    before = sae.W_dec.detach().clone()
    sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(
        sae.W_dec.norm(dim=1), torch.ones(NUM_LATENTS, dtype=F64), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        sae.W_dec.detach(), before / before.norm(dim=1, keepdim=True), rtol=1e-12, atol=1e-12
    )


# ------------------------------------------------------------------------------------ errors
def test_k_larger_than_num_latents():
    with pytest.raises(ValueError, match=r"k=100\b"):
        Sae(4, SaeConfig(expansion_factor=2, k=100))


def test_wrong_input_width():
    sae = make_sae()
    bad = torch.randn(3, D_IN + 1, dtype=F64)
    with pytest.raises(ValueError, match=f"d_in={D_IN}"):
        sae.encode(bad)
    with pytest.raises(ValueError, match=f"d_in={D_IN}"):
        sae(bad)


def test_malformed_arguments_are_named():
    sae = make_sae()
    x = torch.randn(3, D_IN, dtype=F64)
    with pytest.raises(ValueError, match=f"input is a scalar but this SAE has d_in={D_IN}"):
        sae.encode(torch.tensor(1.0))
    n = sae.num_latents
    for mask, got in [(torch.ones(10, dtype=torch.bool), r"torch.bool of shape \(10,\)"),
                      (torch.ones(n), rf"torch.float32 of shape \({n},\)"),
                      (x, r"torch.float64 of shape \(3, 16\) \(this is forward\(x, dead_mask\), not sparsify's forward\(x, y\)\)")]:
        with pytest.raises(ValueError, match=rf"dead_mask must be a bool tensor of shape \({n},\), one flag per latent, got {got}"):
            sae(x, mask)
    acts, idx = sae.encode(x)
    with pytest.raises(ValueError, match=r"top_acts \(3, 4\) and top_indices \(3, 3\) must have one shape"):
        sae.decode(acts, idx[:, :3])


def test_empty_batch():
    sae = make_sae()
    out = sae(torch.randn(2, 0, D_IN, dtype=F64), dead_mask=torch.ones(sae.num_latents, dtype=torch.bool))
    assert out.sae_out.shape == (2, 0, D_IN) and out.latent_indices.shape == (2, 0, K)


@pytest.mark.parametrize("k", [0, -1])
def test_k_must_be_positive(k):
    with pytest.raises(ValueError, match="k must be at least 1"):
        SaeConfig(k=k)


# ------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_model_float32_input(dtype):
    sae = make_sae(dtype=dtype)
    x = rand_x(4, 6).float()
    top_acts, top_indices = sae.encode(x)
    assert top_acts.dtype == dtype and top_indices.shape == (4, 6, K)
    # encode centres the input in fp32, then casts the difference to the model's dtype.
    centred = (x - sae.b_dec.float()).to(dtype)
    ref_acts, ref_idx = sae.select_topk(torch.relu(torch.nn.functional.linear(centred, sae.encoder.weight,
                                                                              sae.encoder.bias)))
    assert torch.equal(top_acts.sort(-1).values, ref_acts.sort(-1).values)
    assert torch.equal(top_indices.sort(-1).values, ref_idx.sort(-1).values)

    out = sae(x, dead_mask=dead_mask_with(10))
    assert out.sae_out.dtype == dtype and out.sae_out.shape == x.shape
    assert torch.equal(out.latent_indices.sort(-1).values, ref_idx.sort(-1).values)  # the latents encode picks
    assert torch.isfinite(out.fvu) and torch.isfinite(out.auxk_loss)
    (out.fvu + out.auxk_loss).backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in sae.parameters())

    # Loosely agrees with the float64 reference on the same (rounded) weights.
    _, fvu, _, _ = ref_forward(
        x.to(dtype).double().reshape(-1, D_IN), *(p.detach().double() for p in params(sae)), K
    )
    assert abs(out.fvu.item() - fvu.item()) < 0.05 * fvu.item() + 0.02


def test_fp16_losses_do_not_overflow():
    """The losses are summed in fp32: an fp16 sum of squares of a few thousand tokens passes 65504."""
    torch.manual_seed(0)
    sae = Sae(64, SaeConfig(expansion_factor=4, k=8), dtype=torch.float16)
    x = 10 * torch.randn(4096, 64)
    dead = torch.ones(sae.num_latents, dtype=torch.bool)
    out = sae(x, dead)
    assert out.fvu.dtype == torch.float32 and torch.isfinite(out.fvu) and torch.isfinite(out.auxk_loss)
    _, fvu, _, _ = ref_forward(x.half().double(), *(p.detach().double() for p in params(sae)), 8)
    assert abs(out.fvu.item() - fvu.item()) < 1e-2 * fvu.item()
    # A total variance given as a number is the same as a tensor.
    tv = float((x - x.mean(0)).pow(2).sum())
    assert torch.allclose(sae(x, total_variance=tv).fvu, sae(x, total_variance=torch.tensor(tv)).fvu)


def test_what_is_not_a_tensor_or_a_width_is_named():
    sae = make_sae()
    with pytest.raises(TypeError, match=rf"input must be a torch tensor \(\.\.\., d_in={D_IN}\), got ndarray"):
        sae.encode(torch.randn(3, D_IN).numpy())
    with pytest.raises(ValueError, match=f"has last dimension 5 but this SAE has d_in={D_IN}"):
        sae.pre_acts(torch.randn(3, 5, dtype=F64))
    for d_in in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"d_in must be a positive whole number, got {d_in!r}"):
            Sae(d_in, SaeConfig())
