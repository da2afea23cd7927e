"""The lr schedule of `saetrain fit`: a linear warmup, then constant or a linear or cosine decay to 0."""

from __future__ import annotations

import json
import re

import pytest
import torch

from sae_core import UserError
from saetrain import fit
from saetrain.cli import main
from saetrain.schedule import lr_factor
from saetrain.settings import LR_SCHEDULES
from tests.test_fit import _metrics, cfg


def test_the_decays_are_transformers_schedules():
    """Past the warmup, the factors are those of transformers' get_linear/cosine_schedule_with_warmup
    (EleutherAI's `sae` trained with the linear one); in the warmup, step s takes (s + 1) / warmup,
    one step ahead of them (no update at lr 0)."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    assert LR_SCHEDULES == ("constant", "linear", "cosine")
    for warmup, end in ((0, 10), (5, 40), (1, 2), (7, 8), (3, 1000)):
        for name, make in (("linear", get_linear_schedule_with_warmup), ("cosine", get_cosine_schedule_with_warmup)):
            opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            sched, ref = make(opt, warmup, end), []
            for _ in range(end):
                ref.append(opt.param_groups[0]["lr"])
                opt.step()
                sched.step()
            ours = [lr_factor(s, warmup, name, end) for s in range(end)]
            assert ours[warmup:] == pytest.approx(ref[warmup:], abs=1e-12), (name, warmup, end)
            assert ours[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
            assert ref[:warmup] == pytest.approx([s / warmup for s in range(warmup)])
            assert ours[-1] > 0 and lr_factor(end, warmup, name, end) == pytest.approx(0, abs=1e-12)
            # A decay that starts at step 9 (a run continuing another, past its warmup) is the curve of a
            # run without warmup, over its own steps.
            later = [lr_factor(s, warmup, name, end + 9, start=9) for s in range(9, end + 9)]
            assert later == pytest.approx([lr_factor(s, 0, name, end) for s in range(end)])
        assert [lr_factor(s, warmup) for s in range(end)] == [min(1, (s + 1) / max(warmup, 1)) for s in range(end)]


def test_a_decay_ends_at_the_runs_last_step(store_path, tmp_path):
    """The step a decay reaches 0 at is worked out before the run (recorded in config.json): it is
    the step after the run's last, whatever makes the steps: epochs, a tail of an epoch that joins
    the step before it or makes one of its own, gradient accumulation, --max-tokens inside an epoch."""
    warmup = 3
    runs = [dict(batch_size=256, epochs=2), dict(batch_size=384, epochs=3), dict(batch_size=400),
            dict(batch_size=384, grad_acc_steps=2), dict(batch_size=256, grad_acc_steps=4, epochs=2),
            dict(batch_size=256, epochs=3, max_tokens=5 * 256 + 1), dict(batch_size=384, epochs=2, max_tokens=10**9)]
    tails = set()
    for i, kw in enumerate(runs):
        out, schedule = tmp_path / f"r{i}", LR_SCHEDULES[1 + i % 2]
        res = fit(cfg(store_path, out, layers="1", lr_schedule=schedule, lr_warmup_steps=warmup, **kw))
        config = json.loads((out / "config.json").read_text())
        lines = _metrics(out)
        assert config["lr_schedule_steps"] == res.steps == len(lines), kw
        lr = config["lr_per_layer"]["layer_1"]
        assert [ln["lr"] for ln in lines] == pytest.approx([lr * lr_factor(s, warmup, schedule, res.steps)
                                                            for s in range(res.steps)]), kw
        assert 0 < lines[-1]["lr"] < lines[-2]["lr"]
        tails.add(res.tokens % kw["batch_size"] != 0)
    assert tails == {True, False}  # runs of whole steps only, and runs with a tail


def _steps_as_the_loader_cuts_them(epoch_tokens: list[int], size: int, ranks: int, max_tokens: int | None) -> int:
    """Optimizer steps of `size` tokens per rank over epochs of these tokens per rank, each step as
    StoreLoader.batches sizes it (saetrain.loader._group_sizes), stopping after the step that reaches
    `max_tokens` (counted over the ranks), as `_train` does."""
    from saetrain.loader import _group_sizes

    steps = seen = 0
    for n in epoch_tokens:
        while n:
            take = sum(_group_sizes(n, size, 1))
            n, steps, seen = n - take, steps + 1, seen + take * ranks
            if max_tokens and seen >= max_tokens:
                return steps
    return steps


def test_planned_steps_are_the_steps_the_loader_makes_and_most_steps_bounds_them():
    """`planned_steps` (the end of a decay over this run) against a step-by-step count of the loader's
    own cutting, with data-parallel ranks, tails and --max-tokens; `most_steps` (a pipeline's rounds)
    is never below it, whatever part of a window a rank gets."""
    import random

    from saetrain.schedule import most_steps, planned_steps

    rng = random.Random(0)
    for _ in range(3000):
        ranks, size, epochs = rng.randint(1, 3), rng.randint(1, 40), rng.randint(1, 3)
        window = rng.randint(1, 400) * ranks
        tokens = [rng.randint(1, window // ranks) for _ in range(epochs)]  # this rank's (the smallest) share
        max_tokens = rng.choice([None, rng.randint(1, 2 * window * epochs)])
        expected = _steps_as_the_loader_cuts_them(tokens, size, ranks, max_tokens)
        assert planned_steps(tokens.__getitem__, size, ranks, epochs, max_tokens) == expected
        assert expected <= most_steps(window, size * ranks, epochs, max_tokens), (tokens, size, ranks, max_tokens)
    # The bound is tight for a whole window in one process: 10.5 steps an epoch take 11 (the tail is one).
    assert most_steps(21 * 1024, 2048, epochs=2) == 22 == _steps_as_the_loader_cuts_them([21 * 1024] * 2, 2048, 1, None)


def test_an_init_from_chain_decays_over_the_steps_given(store_path, tmp_path):
    """--lr-schedule-steps counts from the chain's start: the run it continues, then this one; the
    recipe of a pipeline in rounds gives its total, so one decay spans every round."""
    a, b = tmp_path / "a", tmp_path / "b"
    run = dict(layers="1", lr_schedule="linear", lr_warmup_steps=3, max_tokens=10 * 64)
    ra = fit(cfg(store_path, a, **run, lr_schedule_steps=40))
    rb = fit(cfg(store_path, b, **run, lr_schedule_steps=40, init_from=a))
    lr = json.loads((a / "config.json").read_text())["lr_per_layer"]["layer_1"]
    lines = _metrics(a) + _metrics(b)
    assert [ln["step"] for ln in lines] == list(range(1, rb.steps + 1))  # (a run's steps count the chain's)
    assert [ln["lr"] for ln in lines] == pytest.approx([lr * lr_factor(s, 3, "linear", 40) for s in range(len(lines))])
    # Without the total, the run continued decays over itself, from the full lr to 0 at its end: a cool-down.
    fit(cfg(store_path, tmp_path / "c", **run, init_from=a))
    assert json.loads((tmp_path / "c" / "config.json").read_text())["lr_schedule_steps"] == 2 * ra.steps
    n = ra.steps
    assert [ln["lr"] for ln in _metrics(tmp_path / "c")] == pytest.approx([lr * (1 - i / n) for i in range(n)])
    # A decay that would end before the run does is refused before anything is written.
    with pytest.raises(UserError, match=re.escape(
            f"--lr-schedule-steps 15 ends the linear decay before the run does (at step {2 * ra.steps}), leaving "
            "its last steps at lr 0; raise it (0: the run's end) or train fewer tokens (--epochs, --max-tokens)")):
        fit(cfg(store_path, tmp_path / "d", **run, lr_schedule_steps=15, init_from=a))
    assert not (tmp_path / "d").exists()


def test_resume_keeps_the_decay(store_path, tmp_path):
    out = tmp_path / "run"
    run = dict(layers="1", lr_schedule="cosine", lr_warmup_steps=3, save_every=2, epochs=2)
    done = fit(cfg(store_path, out, **run))
    end = done.steps
    # The same settings resume (nothing is left to train); more epochs would move the decay's end.
    assert fit(cfg(store_path, out, **run, resume=True)).steps == end
    with pytest.raises(UserError, match=re.escape(
            f"cannot resume {out}: its cosine lr decay reaches 0 at step {end} and these settings put that at step "
            f"{end + end // 2}; resume with the run's --epochs and --max-tokens, continue it as a new run with "
            "--init-from (its decay starts anew), or start over with --overwrite")):
        fit(cfg(store_path, out, **{**run, "epochs": 3}, resume=True))
    # Fewer epochs end it sooner: keeping the run's end is possible then.
    with pytest.raises(UserError, match=re.escape(f"(or pass --lr-schedule-steps {end}), continue")):
        fit(cfg(store_path, out, **{**run, "epochs": 1}, resume=True))
    fit(cfg(store_path, out, **{**run, "epochs": 1}, lr_schedule_steps=end, resume=True))
    with pytest.raises(UserError, match=re.escape(
            f"--lr-schedule-steps put that at step {end + 5}; pass the run's --lr-schedule-steps {end}, continue")):
        fit(cfg(store_path, out, **run, lr_schedule_steps=end + 5, resume=True))
    # Another setting that moves the end is named as itself, not as the decay's end.
    for change, key in ((dict(lr_schedule="linear"), "lr_schedule"), (dict(batch_size=32), "batch_size")):
        with pytest.raises(UserError, match=rf"^cannot resume .*: {key} differs \(run: "):
            fit(cfg(store_path, out, **{**run, **change}, resume=True))


@pytest.mark.parametrize("args, message", [
    (["--lr-schedule", "step"], "--lr-schedule must be one of constant, linear, cosine, got 'step'"),
    (["--lr-schedule-steps", "100"], "--lr-schedule-steps 100 sets where a decay ends, and --lr-schedule is constant; "
                                     "pass --lr-schedule linear or cosine, or drop --lr-schedule-steps"),
    (["--lr-schedule", "linear", "--lr-schedule-steps", "-1"], "--lr-schedule-steps must be >= 0, got -1"),
])
def test_bad_schedules_are_refused(store_path, tmp_path, capsys, args, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["fit", "--store", str(store_path), "--out", str(out), "--no-progress", *args])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not out.exists()
