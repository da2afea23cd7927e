"""saetrain on real SmolLM2 activations collected in the test (slow; runs in CI)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from actcache import CollectConfig, collect
from sae_core import Sae
from sae_core.store import ActivationStore
from saetrain import TrainConfig, fit
from saetrain.evaluate import heldout_fvu

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "acts.zarr"
    # Layer 6 stops the forward pass at block 6 of 30: cheap to collect on a CPU.
    collect(CollectConfig(out=out, layers="6", ctx_len=256, max_tokens=24_576, batch_size=8, progress=False))
    return out


def test_fvu_falls_dead_latents_stay_few_and_saved_saes_reproduce_it(smol_store, tmp_path):
    run = tmp_path / "run"
    res = fit(TrainConfig(
        store=smol_store, out=run, k=32, expansion_factor=4, batch_size=512, epochs=3, lr_warmup_steps=10,
        exclude_first_tokens=1, holdout=0.1, dead_feature_threshold=5_000, device="cpu", progress=False,
        save_every=0, seed=0,
    ))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    fvu = [ln["fvu"] for ln in lines]
    # Bound: a k=32 code of 2304 latents trained for ~130 steps. PCA with 32 components leaves
    # ~0.45 of the variance of this layer unexplained (measured when writing this test); the SAE
    # must do clearly better than random (FVU ~1) and beat that linear baseline.
    assert fvu[0] > 0.8
    assert res.heldout_fvu["layer_6"] < 0.4, res.heldout_fvu
    assert np.mean(fvu[-10:]) < 0.4
    # With AuxK on, latents that stop firing for 5k tokens are pushed back: few stay dead.
    assert np.mean([ln["dead_fraction"] for ln in lines[-10:]]) < 0.1
    # The published SAEs load like EleutherAI's and give the FVU the run reported.
    saes = Sae.load_many(run, local=True)
    config = json.loads((run / "config.json").read_text())
    again = heldout_fvu(saes, ActivationStore(smol_store), config["holdout_chunks"], exclude_first_tokens=1)
    assert again["layer_6"] == pytest.approx(res.heldout_fvu["layer_6"], rel=1e-5)
