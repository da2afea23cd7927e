"""The starting point of training: what `saetrain` does to a fresh `Sae` before the first step."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from sae_core import Sae, SaeConfig
from saetrain import TrainConfig
from saetrain.trainer import ENCODER_INIT_NORM, LayerTrainer


def _trainer(normalize_decoder: bool) -> LayerTrainer:
    cfg = TrainConfig(store=Path("unused"), out=Path("unused"), normalize_decoder=normalize_decoder)
    sae_cfg = SaeConfig(num_latents=96, k=4, normalize_decoder=normalize_decoder)
    return LayerTrainer("layer_0", 40, cfg, sae_cfg, lr=1e-3, device=torch.device("cpu"), seed=7)


def test_the_encoder_starts_as_the_decoder_transpose_at_kaiming_row_norm():
    """Gao et al.'s encoder = transpose of the unit-norm decoder, scaled to the row norm of sparsify's
    Kaiming-initialised encoder (1/sqrt(3)): same directions, smaller start (docs/benchmarks.md)."""
    t = _trainer(normalize_decoder=True)
    W_dec = t.sae.W_dec.detach()
    torch.testing.assert_close(W_dec.norm(dim=1), torch.ones(96))
    torch.testing.assert_close(t.sae.encoder.weight.detach(), W_dec / 3**0.5)
    assert ENCODER_INIT_NORM == pytest.approx(3**-0.5)
    assert torch.count_nonzero(t.sae.encoder.bias) == 0 and torch.count_nonzero(t.sae.b_dec) == 0
    # The row norm of a Kaiming-uniform nn.Linear(40, 96), which sparsify's encoder keeps: the same scale.
    torch.manual_seed(0)
    kaiming = torch.nn.Linear(40, 96).weight.detach().norm(dim=1)
    assert kaiming.mean().item() == pytest.approx(ENCODER_INIT_NORM, rel=0.05)
    # `Sae` on its own keeps the exact transpose; the scale is the trainer's.
    torch.manual_seed(7)
    plain = Sae(40, SaeConfig(num_latents=96, k=4))
    torch.testing.assert_close(plain.encoder.weight.detach(), plain.W_dec.detach())


def test_without_decoder_normalisation_the_linear_init_is_kept():
    t = _trainer(normalize_decoder=False)
    torch.manual_seed(7)
    expected = Sae(40, SaeConfig(num_latents=96, k=4, normalize_decoder=False))
    torch.testing.assert_close(t.sae.encoder.weight, expected.encoder.weight)  # not scaled a second time
    torch.testing.assert_close(t.sae.W_dec, expected.W_dec)


def test_a_run_shorter_than_its_warmup_is_noted(store_path, tmp_path, capsys):
    from saetrain.cli import main

    base = ["fit", "--store", str(store_path), "--k", "4", "--expansion-factor", "4", "--batch-size", "64",
            "--holdout", "0", "--no-progress"]
    with pytest.raises(SystemExit) as done:
        main([*base, "--out", str(tmp_path / "long"), "--lr-warmup-steps", "100"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    steps = int(re.search(r"trained 4 SAE\(s\), (\d+) steps", out).group(1))
    assert 0 < steps < 100
    assert out.splitlines()[-2] == (
        f"note: the run ended at step {steps}, before its lr warmup did (--lr-warmup-steps 100): the lr reached "
        f"{steps / 100:.0%} of its target; lower --lr-warmup-steps for a run at the full rate (a run continuing "
        "this one with --init-from goes on warming up)")
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "short"), "--lr-warmup-steps", str(steps)])
    assert "warmup" not in capsys.readouterr().out


def test_a_run_too_short_for_auxk_is_noted(store_path, tmp_path, capsys):
    """AuxK acts on latents dead for --dead-feature-threshold tokens: a run of fewer tokens (sparsify's
    default is 10M) never reaches it, and says so; with a lower threshold (or no AuxK) there is no note."""
    from saetrain.cli import main

    base = ["fit", "--store", str(store_path), "--layers", "1", "--k", "4", "--expansion-factor", "4", "--batch-size",
            "64", "--holdout", "0", "--lr-warmup-steps", "2", "--no-progress"]
    with pytest.raises(SystemExit) as done:
        main([*base, "--out", str(tmp_path / "a")])
    assert done.value.code == 0
    out = capsys.readouterr().out
    tokens = int(re.search(r"steps, ([\d,]+) tokens", out).group(1).replace(",", ""))
    assert out.splitlines()[-1] == (
        f"note: a latent counts as dead after 10,000,000 tokens without firing (--dead-feature-threshold), more than "
        f"the {tokens:,} trained on, so AuxK, which revives dead latents, never acted; lower it for a run this short "
        "(e.g. to a tenth of its tokens)")
    for i, extra in enumerate((["--dead-feature-threshold", str(tokens // 10)], ["--auxk-alpha", "0"])):
        with pytest.raises(SystemExit):
            main([*base, "--out", str(tmp_path / f"b{i}"), *extra])
        assert "note" not in capsys.readouterr().out
