"""Configs built from Python: every field checked (and converted where nothing is lost) by its annotation."""

from __future__ import annotations

from pathlib import Path

import pytest

from sae_core import UserError
from saetrain import fit
from tests.test_fit import cfg


def test_a_python_collect_config_is_checked_field_by_field(tmp_path, monkeypatch):
    from actcache import CollectConfig

    with pytest.raises(UserError, match=r"CollectConfig.ctx_len must be a whole number, got 32.5"):
        CollectConfig(out=tmp_path / "s.zarr", ctx_len=32.5)
    with pytest.raises(UserError, match=r"CollectConfig.out must be a non-empty path, got None"):
        CollectConfig(out=None)
    monkeypatch.setenv("HOME", str(tmp_path))
    c = CollectConfig(out="~/s.zarr", layers=[0, 2], hookpoints="model.norm", max_tokens=1e3, seed=None)
    assert (c.out, c.layers, c.hookpoints, c.max_tokens, c.seed) == (tmp_path / "s.zarr", "0,2", ["model.norm"], 1000, None)
    import torch

    c = CollectConfig(out=tmp_path / "t.zarr", model=tmp_path / "model", dataset=tmp_path / "data", hookpoints=None,
                      model_dtype=torch.bfloat16, device=torch.device("cpu"))
    assert (c.model, c.dataset, c.hookpoints) == (str(tmp_path / "model"), str(tmp_path / "data"), [])


def test_a_python_config_is_checked_field_by_field(store_path, tmp_path):
    """From Python, a value of the wrong type is named before anything runs; lossless spellings are taken
    (`1e3` tokens, `[1, 2]` or `1` for layers, `~` in paths)."""
    from saetrain import TrainConfig

    for kw, expected in [(dict(k=4.5), "TrainConfig.k must be a whole number, got 4.5"),
                         (dict(lr="1e-3"), "TrainConfig.lr must be a number or None, got '1e-3'"),
                         (dict(exclude_token_ids=5), "TrainConfig.exclude_token_ids must be a list of whole numbers, got 5"),
                         (dict(resume="yes"), "TrainConfig.resume must be True or False, got 'yes'"),
                         (dict(init_from=""), "TrainConfig.init_from must be a non-empty path or None, got ''")]:
        with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            cfg(store_path, tmp_path / "run", **kw)
    assert not (tmp_path / "run").exists()
    import numpy as np

    c = TrainConfig(store=store_path, out="~/runs/a", layers=[1, np.int64(2)], batch_size=64.0, max_tokens=1e3,
                    exclude_token_ids=None, device=None, resume=np.True_)
    assert (c.out, c.layers, c.batch_size, c.max_tokens) == (Path.home() / "runs" / "a", "1,2", 64, 1000)
    assert (c.exclude_token_ids, c.device, c.resume) == ([], None, True)
    assert TrainConfig(store=store_path, out="r", exclude_token_ids=np.array([0, 5]), layers=np.int64(3)).layers == "3"
    result = fit(cfg(store_path, tmp_path / "run", layers=1, max_tokens=64.0))
    assert result.layers == ["layer_1"] and result.tokens == 64
