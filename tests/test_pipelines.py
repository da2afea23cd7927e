"""pipelines.run: a recipe in rounds collects one window of the data at a time and trains on from the last round."""

from __future__ import annotations

import json

from actcache import CollectConfig
from pipelines import presets, run
from sae_core.store import ActivationStore
from saetrain import TrainConfig


def test_rounds_train_on_consecutive_windows(tmp_path, tiny_model_dir, tiny_text_dir, monkeypatch, capsys):
    store, runs = tmp_path / "acts.zarr", tmp_path / "saes"
    recipe = presets.Recipe(
        "tiny-rounds", "tiny model, windows of 12 sequences",
        CollectConfig(out=store, model=str(tiny_model_dir), dataset=str(tiny_text_dir), layers="1,2", ctx_len=32,
                      max_tokens=12 * 32, seqs_per_shard=4, chunk_tokens=32, dtype="float32", device="cpu",
                      progress=False),
        TrainConfig(store=store, out=runs, k=4, expansion_factor=4, batch_size=64, lr_warmup_steps=2, save_every=0,
                    shuffle_window=4, device="cpu", progress=False),
        rounds=4,
    )
    monkeypatch.setitem(presets.PRESETS, "tiny-rounds", lambda: recipe)
    assert run.main(["tiny-rounds"]) == 0
    text = capsys.readouterr().out
    # The data (33 sequences) holds three windows: the fourth round finds it exhausted.
    assert "round 3/4: tokens 768 to 1,152" in text and "the data ends before token 1,152: stopping after 3 round(s)" in text
    assert json.loads((runs / "rounds.json").read_text()) == {"done": 2, "latest": str(runs / "round_0002")}
    assert sorted(p.name for p in runs.glob("round_*")) == ["round_0002"]  # earlier rounds are folded in
    assert ActivationStore(store).meta["data"]["skip_tokens"] == 768
    config = json.loads((runs / "round_0002" / "config.json").read_text())
    steps = [json.loads(ln)["step"] for ln in (runs / "round_0002" / "metrics.jsonl").read_text().splitlines()]
    # Round 2 starts after the 12 + 12 sequences (6 + 6 steps of 64 tokens) of rounds 0 and 1.
    assert config["init_from"] == {"run": str(runs / "round_0001"), "step": 12, "tokens": 768}
    assert steps[0] == 13 and steps[-1] == 13 + 4  # the last window holds 9 sequences: 4 full steps + 1 partial
    assert run.main(["tiny-rounds"]) == 0  # a rerun continues after the last finished round: nothing left
    assert "stopping after 3 round(s)" in capsys.readouterr().out
