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
