"""The CPU-runnable benchmarks run end to end on a tiny shape (their numbers are in docs/benchmarks.md)."""

from __future__ import annotations

import re

import sae_core.sae
from benchmarks import auxk


def test_auxk_benchmark_times_both_ways_and_restores_the_threshold(capsys):
    before = dict(sae_core.sae.AUXK_DENSE_RATIO)
    assert auxk.main(["--device", "cpu", "--d-in", "16", "--latents", "64", "--k", "4", "--tokens", "32",
                      "--dead-fracs", "0.05,1.0", "--repeats", "1"]) == 0
    assert sae_core.sae.AUXK_DENSE_RATIO == before
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x\s+(dense|sparse)$",
                      capsys.readouterr().out, re.M)
    # 3 of 64 dead (k_aux 8 -> 3 selected, 1 per selected: dense); all 64 dead (8 per selected: dense at ratio 8).
    assert [(int(r[0]), r[5]) for r in rows] == [(3, "dense"), (64, "dense")]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)


def test_gpu_pipeline_runs_on_cpu(tmp_path, capsys):
    """benchmarks/gpu_pipeline.py (step 5 of gpu_check.sh) works through the CLIs, tried on the CPU."""
    from benchmarks import gpu_pipeline

    rc = gpu_pipeline.main(["--device", "cpu", "--layers", "2", "--d-model", "64", "--tokens", "20000",
                            "--ctx-len", "128", "--batch-size", "512", "--epochs", "1", "--keep", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "ok: both stages ran end to end" in out
    assert "held-out FVU per layer: cpu | cpu x2" in out
    rows = re.findall(r"^  (layer_\d+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert [r[0] for r in rows] == ["layer_0", "layer_1"]
    assert all(0 < float(r[1]) < 1 and 0 < float(r[2]) < 1 for r in rows)
    assert (tmp_path / "acts.zarr").is_dir() and (tmp_path / "run-cpu" / "layer_0").is_dir()
    assert (tmp_path / "run-cpux2" / "layer_0").is_dir()


def test_data_benchmark_times_windows_against_the_whole(tiny_model_dir, tmp_path, capsys):
    from benchmarks import data

    assert data.main(["--copies", "2", "--corpus-bytes", "700000", "--ctx-len", "256", "--window-tokens", "4096",
                      "--model", str(tiny_model_dir), "--tmp-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^1\.4 MB of text in 5 documents, [\d,]+ tokens packed at ctx 256; window 16 sequences "
                     r"\(4,096 tokens\); cache entries 0$", out, re.M), out  # 1.4 MB < CACHE_MIN_BYTES: not cached
    rows = re.findall(r"^(whole dataset, uncached|first window, cold|second window|first window again)\s+([\d.]+)\s+"
                      r"([\d.]+)$", out, re.M)
    assert [r[0] for r in rows] == ["whole dataset, uncached", "first window, cold", "second window", "first window again"]
    assert float(rows[0][2]) == 1 and all(float(r[1]) > 0 for r in rows)
    assert "reproduce with:\n  python -m benchmarks.data --copies 2" in out


def test_fit_quality_benchmark_compares_recipes_and_restores_the_default(store_path, capsys):
    import saetrain.trainer
    from benchmarks import fit_quality

    before = saetrain.trainer.ENCODER_INIT_NORM
    assert fit_quality.main(["--store", str(store_path), "--layers", "1", "--norms", "1,0.5", "--lr-schedules",
                             "constant,linear", "--k", "4", "--expansion-factor", "4", "--batch-size", "64", "--epochs",
                             "1", "--lr-warmup-steps", "2", "--holdout", "0.2"]) == 0
    assert saetrain.trainer.ENCODER_INIT_NORM == before
    out = capsys.readouterr().out
    rows = re.findall(r"^\s+layer_1\s+([\d.]+)\s+(\w+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)%$", out, re.M)
    assert [r[:2] for r in rows] == [("1.000", "constant"), ("1.000", "linear"), ("0.500", "constant"),
                                     ("0.500", "linear")]
    assert all(0 < float(r[2]) < 2 and 0 < float(r[3]) < 2 for r in rows)
    # The runs differ in the encoder's start or the lr after warmup only, so their results differ.
    assert len({r[2] for r in rows}) == 4
    assert "reproduce with:\n  python -m benchmarks.fit_quality --store" in out
