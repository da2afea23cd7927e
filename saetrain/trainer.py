"""`saetrain fit`: train one TopK SAE per layer from a store (Gao et al. 2024, as EleutherAI's `sae`).

Each layer has its own SAE, Adam optimizer and dead-latent counters; all layers of a process
see the same batches. Under torchrun, `--distribute-layers` splits the layers between ranks
(each reads only its own layers); otherwise ranks split the data and average gradients.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from sae_core import Sae, SaeConfig, UserError
from sae_core.distributed import (
    alike_on_every_rank,
    any_error,
    barrier,
    init_distributed,
    over_ranks,
    rank_device,
)
from sae_core.errors import collective
from sae_core.ops import forced_backend
from sae_core.store import ActivationStore
from sae_core.store.manifest import atomic_write

from . import checkpoint as ckpt
from .config import TrainConfig
from .evaluate import heldout_fvu
from .loader import StoreLoader
from .plan import plan_layers
from .schedule import lr_decay, lr_factor
from .settings import RESUME_KEYS, is_run, read_run_config, resolve_config, select_layers, validate


@dataclass
class FitResult:
    out: Path
    steps: int
    tokens: int
    seconds: float
    heldout_fvu: dict[str, float]
    layers: list[str]
    chain_tokens: int = 0
    """Training tokens since the start of the --init-from chain (this run's `tokens` without one)."""


def geometric_median(x: torch.Tensor, iters: int = 50, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to the rows of x."""
    x = x.float()
    y = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - y).norm(dim=1).clamp_min(1e-8)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * y.norm().clamp_min(1e-8):
            return y_new
        y = y_new
    return y


# The losses of Sae.forward that are logged per step (fields of its ForwardOutput).
_LOSSES = ("fvu", "auxk_loss", "multi_topk_fvu")

# The encoder starts as the unit-norm decoder's transpose (Gao et al.; `Sae`'s own init), scaled to this
# row norm: that of a Kaiming-uniform nn.Linear row, where sparsify's encoder starts. On SmolLM2 it
# lowers the held-out FVU 6-25% against norm 1 at the same lr (docs/benchmarks.md, "Encoder init").
ENCODER_INIT_NORM = 3**-0.5


class LayerTrainer:
    """One SAE with its optimizer, dead-latent counters and metrics."""

    def __init__(self, name: str, d_in: int, cfg: TrainConfig, sae_cfg: SaeConfig, lr: float, device, seed: int,
                 decay: tuple[int, int] | None = None):
        self.name = name
        self.decay = decay or (0, 0)  # the steps a linear or cosine decay starts from and reaches 0 at (lr_factor)
        torch.manual_seed(seed)
        self.sae = Sae(d_in, sae_cfg, device=device, dtype=torch.float32)
        if sae_cfg.normalize_decoder:  # (otherwise the encoder keeps nn.Linear's init, already at that norm)
            with torch.no_grad():
                self.sae.encoder.weight.mul_(ENCODER_INIT_NORM)
        self.lr = lr
        # The fused Adam (one kernel for all parameters) is ~7x faster than the per-tensor loop on CPU.
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr, eps=6.25e-10, fused=True)
        self.since_fired = torch.zeros(self.sae.num_latents, dtype=torch.long, device=device)
        self.fired = torch.zeros(self.sae.num_latents, dtype=torch.bool, device=device)
        self.cfg = cfg
        # Running sums of the losses and the moments of the step's tokens, kept on the device: read once
        # per optimizer step, so the micro-batches and the layers queue their work without waiting.
        self.sums = torch.zeros(len(_LOSSES), dtype=torch.float64, device=device)
        self._moments()

    def _moments(self) -> None:
        """Start the step's count, mean and summed squared deviation (Chan et al.'s merge, in fp64)."""
        self.count = 0
        self.mean = torch.zeros(self.sae.d_in, dtype=torch.float64, device=self.since_fired.device)
        self.m2 = torch.zeros((), dtype=torch.float64, device=self.since_fired.device)

    def dead_mask(self) -> torch.Tensor | None:
        return self.since_fired > self.cfg.dead_feature_threshold if self.cfg.auxk_alpha > 0 else None

    def backward(self, x: torch.Tensor, autocast: bool) -> None:
        """Accumulate the gradients of one batch of the step (`--grad-acc-steps` batches make a step).

        The losses are over the variance of all the step's tokens, which is known only once its last
        batch is in: here they are raw sums of squared errors (over a variance of 1), and `step`
        divides the gradients and the logged losses by the step's variance. So micro-batches and
        accumulated batches add up to the step's losses, whatever their sizes (one token included).
        """
        dead = self.dead_mask()
        mean = x.mean(0)
        n, m2 = len(x), (x - mean).pow(2).sum().double()
        delta = mean.double() - self.mean
        total = self.count + n
        self.m2 += m2 + delta.pow(2).sum() * (self.count * n / total)
        self.mean += delta * (n / total)
        self.count = total
        one = torch.ones((), device=x.device)
        for micro in x.chunk(self.cfg.micro_acc_steps):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                out = self.sae(micro, dead_mask=dead, total_variance=one)
                loss = out.fvu + self.cfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
            loss.backward()
            self.fired[out.latent_indices.flatten()] = True
            self.sums += torch.stack([getattr(out, k).detach().double() for k in _LOSSES])

    def step(self, step: int, tokens: int, dp: bool) -> dict:
        sae = self.sae
        variance = self.m2.clamp_min(torch.finfo(torch.float32).tiny)
        for p in sae.parameters():
            if p.grad is not None:
                p.grad /= variance.float()
                if dp:
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()
        if dp:
            dist.all_reduce(self.fired.view(torch.uint8), op=dist.ReduceOp.MAX)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), self.cfg.grad_clip)
        if sae.cfg.normalize_decoder:
            sae.remove_gradient_parallel_to_decoder_directions()
        start, end = self.decay
        lr = self.lr * lr_factor(step, self.cfg.lr_warmup_steps, self.cfg.lr_schedule, end, start)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if sae.cfg.normalize_decoder:
            sae.set_decoder_norm_to_unit_norm()
        self.since_fired += tokens
        self.since_fired[self.fired] = 0
        self.fired.zero_()
        losses = self.sums / variance
        if dp:
            dist.all_reduce(losses)
            losses /= dist.get_world_size()
        metrics = dict(zip(_LOSSES, losses.tolist(), strict=True))
        self.sums.zero_()
        self._moments()
        metrics["dead_fraction"] = (self.since_fired > self.cfg.dead_feature_threshold).float().mean().item()
        metrics["lr"] = lr
        return metrics


def fit(cfg: TrainConfig) -> FitResult:
    try:
        return _fit(cfg)
    except BaseException as e:
        first = os.environ.get("RANK", "0") == "0"
        restored = first and cfg.overwrite and ckpt.restore_replaced(Path(cfg.out))
        if isinstance(e, KeyboardInterrupt) and first and restored:
            print(f"interrupted before the first checkpoint: {cfg.out} holds the run it was replacing again; run the "
                  "same `saetrain fit` command to start over", file=sys.stderr, flush=True)
        elif isinstance(e, KeyboardInterrupt) and first and is_run(Path(cfg.out)):
            # Ctrl-C: say what survives (the last checkpoint) and how to go on
            last = ckpt.latest_or_none(Path(cfg.out))
            where = f"the last checkpoint is step {last[1]['step']:,}" if last else "no checkpoint was written yet"
            print(f"interrupted: {where} in {cfg.out}; run the same `saetrain fit` command with --resume"
                  f"{' instead of --overwrite' if cfg.overwrite else ''} to continue from it", file=sys.stderr, flush=True)
        raise


def _fit(cfg: TrainConfig) -> FitResult:
    t0 = time.perf_counter()
    with alike_on_every_rank():  # settings, store and run folder: each rank meets the same refusal
        validate(cfg)
        store = ActivationStore(cfg.store)
        if store.num_tokens == 0:
            store.check_manifest()
            raise UserError(f"store {store.path} has no committed tokens; run or finish `actcache collect` first")
        rank, world = init_distributed()
        device = rank_device(cfg.device, rank, world)
        forced_backend(device)  # SAE_CORE_KERNELS, checked before anything is written
        if not store.complete and rank == 0:
            print(f"note: {store.path} is incomplete ({store.num_tokens:,} of {store.layout.num_tokens:,} tokens "
                  "committed); training on the committed part", file=sys.stderr)
        layers = select_layers(store, cfg.layers)
        if cfg.exclude_first_tokens >= store.layout.ctx_len:
            raise UserError(f"--exclude-first-tokens {cfg.exclude_first_tokens} drops every token: the store's sequences "
                            f"have {store.layout.ctx_len}; lower it")
        resolved = resolve_config(cfg, store, layers, world)
        dp = world > 1 and not cfg.distribute_layers
        train_count = len(store.committed_chunks()) - len(resolved["holdout_chunks"])
        if cfg.holdout and rank == 0 and len(resolved["holdout_chunks"]) > 2 * cfg.holdout * len(store.committed_chunks()):
            print(f"note: --holdout {cfg.holdout} holds out {len(resolved['holdout_chunks'])} of "
                  f"{len(store.committed_chunks())} chunks (whole chunks, at least one): "
                  f"{len(resolved['holdout_chunks']) / len(store.committed_chunks()):.0%} of the tokens", file=sys.stderr)
        if dp and train_count < world:
            raise UserError(
                f"{store.path} has {train_count} training chunk(s) for {world} data-parallel ranks, and each rank "
                "needs one; use --distribute-layers or fewer processes, or collect with smaller chunks "
                "(actcache collect --chunk-tokens)"
            )
        out = Path(cfg.out)
        init = _init_source(cfg, out, resolved) if cfg.init_from is not None else None
        if init is not None:
            resolved["init_from"] = {"run": str(cfg.init_from), **init[1]}
        plan = None
        if cfg.distribute_layers:
            plan = plan_layers({n: resolved["d_in"][n] * resolved["num_latents_per_layer"][n] for n in layers}, world)
        mine = plan[rank] if plan else layers

        # Everything that can refuse the data is checked before the run folder is touched.
        held = set(resolved["holdout_chunks"])
        train_chunks = [c for c in store.committed_chunks() if c not in held]
        loader = StoreLoader(
            store, mine, train_chunks, seed=cfg.seed, window=cfg.shuffle_window,
            rank=rank if dp else 0, world=world if dp else 1, exclude_first_tokens=cfg.exclude_first_tokens,
            exclude_token_ids=cfg.exclude_token_ids, device=device, read_threads=cfg.read_threads,
        )
        store.check_shard_files()
    _refuse_together(lambda: _check_finite(store, mine, train_chunks, sorted(held), cfg), world)
    if _epoch_tokens(loader, 0, dp) < 2:
        raise UserError(f"the exclusions leave {loader.epoch_tokens(0)} training token(s) in {store.path}; "
                        "exclude fewer (--exclude-token-ids / --exclude-first-tokens) or lower --holdout")

    # The SAEs and optimizers are made on the device before the run folder is touched too: a device
    # that cannot hold them fails here, with nothing written or deleted.
    sae_cfg = {n: SaeConfig(expansion_factor=cfg.expansion_factor, normalize_decoder=cfg.normalize_decoder,
                            num_latents=resolved["num_latents_per_layer"][n], k=cfg.k, multi_topk=cfg.multi_topk)
               for n in layers}
    decay = lr_decay(cfg, lambda epoch: _epoch_tokens(loader, epoch, dp), resolved["loader_batch"] * cfg.grad_acc_steps,
                     world if dp else 1, init[1]["step"] if init is not None else 0)
    resolved["lr_schedule_steps"] = decay[1] if decay else None
    trainers = {
        n: LayerTrainer(n, resolved["d_in"][n], cfg, sae_cfg[n], resolved["lr_per_layer"][n], device,
                        seed=cfg.seed * 100_003 + layers.index(n), decay=decay)
        for n in mine
    }

    # So is the checkpoint it starts from: a damaged one is refused with the run folder as it was.
    with alike_on_every_rank():
        state = _resume_state(cfg, out, resolved)
    if cfg.resume and state is None and rank == 0:
        why = f"has no checkpoint ({ckpt.LATEST} names none)" if is_run(out) else "does not exist yet" if not out.exists() else ""
        if why:
            print(f"note: {out} {why}: --resume trains it from the beginning", file=sys.stderr)
    start = ckpt.latest(out)[0] if state is not None else init[0] if init is not None else None
    if start is not None:
        def load() -> None:
            for n, t in trainers.items():
                t.since_fired = ckpt.load_layer(start / n, t.sae, t.opt).to(device)

        _refuse_together(load, world)
    _prepare_out(cfg, out, resolved, rank, state)
    if plan and rank == 0:
        atomic_write(out / "plan.json", json.dumps({f"rank{r}": p for r, p in enumerate(plan)}, indent=2))
        print("layer plan: " + "; ".join(f"rank {r}: {', '.join(p) or '(idle)'}" for r, p in enumerate(plan)))
    elif rank == 0:  # a --distribute-layers run resumed without it: its old plan no longer says who trains what
        (out / "plan.json").unlink(missing_ok=True)
    result = _train(cfg, resolved, trainers, loader, store, out, state, rank, world, dp, device, t0)
    return result


def _refuse_together(check, world: int) -> None:
    """Run `check` on every rank; where it refuses on one, every rank raises its error (none is left
    waiting in a collective)."""
    error = None
    try:
        check()
    except UserError as e:
        error = str(e)
    if error := any_error(error, world):
        raise collective(UserError(error))


def _init_source(cfg: TrainConfig, out: Path, resolved: dict) -> tuple[Path | None, dict]:
    """The checkpoint `--init-from` starts from, and its step and cumulative tokens; checks the SAEs match.

    Resuming a run that has a checkpoint of its own needs only what its config.json recorded (the
    run it started from may be gone: a pipeline keeps only the last window's run).
    """
    run = Path(cfg.init_from)
    if run.resolve() == out.resolve():
        raise UserError(f"--init-from {run} is the run folder itself; pass --resume to continue it")
    if cfg.resume and ckpt.latest(out) is not None:
        recorded = read_run_config(out).get("init_from")
        if isinstance(recorded, dict) and recorded.get("run") == str(run):
            return None, {"step": recorded["step"], "tokens": recorded["tokens"]}
    found = ckpt.latest(run) if (run / "config.json").is_file() else None
    if found is None:
        raise UserError(f"--init-from {run}: not a saetrain run with a checkpoint; point it at a finished `saetrain fit --out` folder")
    old = read_run_config(run)
    missing = [n for n in resolved["layers"] if n not in old["layers"]]
    if missing:
        raise UserError(f"--init-from {run} has no SAE for {missing[0]} (it trained {', '.join(old['layers'])}); pass --layers")
    for key in ("d_in", "num_latents_per_layer"):
        for n in resolved["layers"]:
            if old[key][n] != resolved[key][n]:
                raise UserError(
                    f"--init-from {run}: {n} has {key} {old[key][n]} there and {resolved[key][n]} here; "
                    "use the same --num-latents/--expansion-factor and a store of the same model"
                )
    if old.get("store_model") and resolved["store_model"] and old["store_model"] != resolved["store_model"]:
        raise UserError(
            f"--init-from {run} was trained on activations of {old['store_model']}, this store holds "
            f"{resolved['store_model']}; collect the next store with the same --model"
        )
    folder, state = found
    base = (old.get("init_from") or {}).get("tokens", 0)
    return folder, {"step": state["step"], "tokens": base + state["tokens_seen"]}


def _check_finite(store: ActivationStore, layers: list[str], train: list[int], held: list[int], cfg: TrainConfig) -> None:
    """Refuse NaN or inf activations before training rather than in the middle of it.

    The store's statistics count non-finite tokens per layer: without exclusions such a layer is
    refused at once; with them, it is read once to see whether the exclusions remove every bad
    token. The held-out chunks (a small part) are read too, since only evaluation reads them.
    """
    excluding = bool(cfg.exclude_first_tokens or cfg.exclude_token_ids)
    kw = dict(seed=cfg.seed, exclude_first_tokens=cfg.exclude_first_tokens, exclude_token_ids=cfg.exclude_token_ids,
              read_threads=cfg.read_threads)
    for n in layers:
        bad = store.stats(n).nonfinite if n in store.manifest.stats else 0
        if bad and not excluding:
            # Where the first one is, if the first windows hold one (a bounded read: the layer is refused anyway).
            StoreLoader(store, [n], sorted([*train, *held]), **kw).check_finite(windows=4)
            raise UserError(
                f"store {store.path}: {n} has {bad} tokens with NaN or inf activations; exclude them "
                "(--exclude-token-ids / --exclude-first-tokens) or re-collect in a wider dtype"
            )
        if bad:
            StoreLoader(store, [n], train, **kw).check_finite()
    if held and layers:
        loader = StoreLoader(store, layers, held, **kw)
        if (left := loader.epoch_tokens(0)) < 2:
            raise UserError(f"the exclusions leave {left} held-out token(s), and the held-out FVU needs at least 2 "
                            "(it divides by their variance); raise --holdout or exclude fewer")
        try:
            loader.check_finite()
        except UserError as e:
            raise UserError(f"{e} (in a held-out chunk)") from None


def _resume_state(cfg: TrainConfig, out: Path, resolved: dict) -> dict | None:
    """The state of the checkpoint --resume continues from (None: from the start), once the run is
    known to be the same run."""
    state = None
    if cfg.resume and (out / "config.json").is_file():
        old = read_run_config(out)
        if old.get("store_model") and old["store_model"] != resolved["store_model"]:
            raise UserError(
                f"cannot resume {out}: it was trained on activations of {old['store_model']}, this store holds "
                f"{resolved['store_model']}; pass the run's store (or --overwrite)"
            )
        if old.get("store_tokens", resolved["store_tokens"]) != resolved["store_tokens"]:
            raise UserError(
                f"cannot resume {out}: the store had {old['store_tokens']:,} committed tokens when the run started "
                f"and has {resolved['store_tokens']:,} now, which changes the data order and the held-out chunks; "
                "start a new run (another --out) or --overwrite"
            )
        if old.get("store_chunk_tokens", resolved["store_chunk_tokens"]) != resolved["store_chunk_tokens"]:
            raise UserError(
                f"cannot resume {out}: its store had chunks of {old['store_chunk_tokens']} tokens and this one has "
                f"{resolved['store_chunk_tokens']}, which changes the data order and the held-out chunks; pass the "
                "run's store, or start a new run (another --out) or --overwrite"
            )
        if isinstance(old.get("exclude_token_ids"), list):  # (recorded as given before it was a sorted set)
            old["exclude_token_ids"] = sorted(set(old["exclude_token_ids"]))
        old.setdefault("lr_schedule", "constant")  # (runs from before the schedules)
        old.setdefault("lr_schedule_steps", None)
        for key in RESUME_KEYS:
            if key != "lr_schedule_steps" and old.get(key) != resolved.get(key):
                raise UserError(
                    f"cannot resume {out}: {key} differs (run: {old.get(key)!r}, now: {resolved.get(key)!r}); "
                    "use the first run's settings or --overwrite"
                )
        was, now = old["lr_schedule_steps"], resolved["lr_schedule_steps"]
        if was != now:  # a decay, as the run's; only --epochs, --max-tokens or --lr-schedule-steps can move its end
            given = bool(cfg.lr_schedule_steps)
            fix = (f"pass the run's --lr-schedule-steps {was}" if given else "resume with the run's --epochs and "
                   "--max-tokens" + (f" (or pass --lr-schedule-steps {was})" if now < was else ""))
            raise UserError(
                f"cannot resume {out}: its {old['lr_schedule']} lr decay reaches 0 at step {was:,} and "
                f"{'--lr-schedule-steps' if given else 'these settings'} put that at step {now:,}; {fix}, continue it "
                "as a new run with --init-from (its decay starts anew), or start over with --overwrite"
            )
        found = ckpt.latest(out)
        state = found[1] if found else None
    return state


def _prepare_out(cfg: TrainConfig, out: Path, resolved: dict, rank: int, state: dict | None) -> None:
    """Create or reopen the run folder; when resuming, drop the metrics past the checkpoint."""
    barrier()
    if rank == 0:
        if cfg.overwrite and out.is_dir() and any(out.iterdir()):  # set aside until the new run's first checkpoint
            kept = ckpt.replaced_path(out)
            if kept.is_dir() and ckpt.latest_or_none(out) is None:
                # An earlier --overwrite stopped before its first checkpoint (killed): the run kept is still
                # the one being replaced, and what is in `out` is that attempt's beginning.
                print(f"note: {kept} holds the run an earlier --overwrite was replacing; it is kept until this "
                      "run's first checkpoint", file=sys.stderr, flush=True)
                shutil.rmtree(out)
            else:
                shutil.rmtree(kept, ignore_errors=True)
                os.replace(out, kept)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.json", json.dumps(resolved, indent=2))
        metrics = out / "metrics.jsonl"
        if metrics.exists():  # drop lines past the checkpoint we resume from
            keep_until = state["step"] if state else 0
            lines = [ln for ln in metrics.read_text().splitlines() if _step_of(ln) <= keep_until]
            atomic_write(metrics, "".join(ln + "\n" for ln in lines))
    barrier()


def _step_of(line: str) -> float:
    """The step of a metrics line; a torn or empty line (power loss) sorts past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _train(cfg, resolved, trainers, loader, store, out, state, rank, world, dp, device, t0) -> FitResult:
    from tqdm.auto import tqdm

    loader_batch = resolved["loader_batch"]
    init = resolved.get("init_from")
    step = state["step"] if state else init["step"] if init else 0
    base_tokens = init["tokens"] if init else 0  # tokens of the runs this one continues, for the metrics
    epoch = state["epoch"] if state else 0
    offset = state["epoch_tokens"] if state else 0
    tokens_seen = state["tokens_seen"] if state else 0
    max_tokens = cfg.max_tokens or math.inf
    per_epoch = _epoch_tokens(loader, epoch, dp)
    planned = min(cfg.epochs * per_epoch * (world if dp else 1), max_tokens)
    bar = tqdm(total=int(planned), initial=tokens_seen, unit="tok", unit_scale=True,
               disable=not cfg.progress or rank != 0, desc="fit")
    autocast = device.type == "cuda"
    wandb_run = _wandb(cfg, resolved, out) if rank == 0 else None
    metrics_file = open(out / "metrics.jsonl", "a")  # noqa: SIM115 - closed below
    acc = 0
    step_tokens = 0
    first = state is None and init is None  # a fresh SAE: b_dec from the first batch
    try:
        while epoch < cfg.epochs and tokens_seen < max_tokens:
            per_epoch = _epoch_tokens(loader, epoch, dp)
            for batch in loader.batches(epoch, loader_batch, start=offset, stop=per_epoch, group=cfg.grad_acc_steps):
                n_local = len(batch.token_index)
                if first:
                    for t in trainers.values():
                        with torch.no_grad():
                            t.sae.b_dec.copy_(geometric_median(batch.acts[t.name].to(device, torch.float32)))
                            if dp:  # every replica starts from rank 0's median
                                dist.broadcast(t.sae.b_dec.data, src=0)
                    first = False
                for t in trainers.values():
                    t.backward(batch.acts[t.name].to(torch.float32), autocast)
                offset += n_local
                n_global = n_local * (world if dp else 1)
                step_tokens += n_global
                acc += 1
                # A step ends after its accumulation steps or with the epoch; --max-tokens is checked
                # after whole steps (it rounds up to them).
                if acc < cfg.grad_acc_steps and offset < per_epoch:
                    continue
                lines = []
                for t in trainers.values():
                    m = t.step(step, step_tokens, dp)
                    lines.append({"step": step + 1, "layer": t.name, "tokens": base_tokens + tokens_seen + step_tokens, **m})
                step += 1
                # Data-parallel ranks see the same (averaged) losses; under --distribute-layers each has its
                # own layers, and the ranks stop together where any diverged.
                diverged = _diverged(lines, step)
                if world > 1 and not dp and over_ranks(int(diverged is not None), "max"):
                    diverged = any_error(diverged, world)
                if diverged:
                    _stop(diverged, world)
                tokens_seen += step_tokens
                bar.update(step_tokens)
                if lines:  # an idle rank (more ranks than layers) has none
                    bar.set_postfix_str(f"FVU {sum(ln['fvu'] for ln in lines) / len(lines):.3f}", refresh=False)
                acc, step_tokens = 0, 0
                if not dp or rank == 0:
                    metrics_file.write("".join(json.dumps(ln) + "\n" for ln in lines))
                    metrics_file.flush()
                if wandb_run is not None:
                    wandb_run.log({f"{ln['layer']}/{k}": v for ln in lines for k, v in ln.items() if k not in ("step", "layer")},
                                  step=step)
                if cfg.save_every and step % cfg.save_every == 0:
                    _checkpoint(out, trainers, step, epoch, offset, tokens_seen, rank, world, dp)
                if tokens_seen >= max_tokens:
                    break
            if offset >= per_epoch:
                epoch, offset = epoch + 1, 0
        _checkpoint(out, trainers, step, epoch, offset, tokens_seen, rank, world, dp)
    finally:
        metrics_file.close()
        bar.close()
        if wandb_run is not None:
            wandb_run.finish()
    fvu = _evaluate(cfg, resolved, trainers, store, out, rank, world, dp, device)
    return FitResult(out, step, tokens_seen, time.perf_counter() - t0, fvu, list(resolved["layers"]),
                     base_tokens + tokens_seen)


def _wandb(cfg: TrainConfig, resolved: dict, out: Path):
    """Optional Weights & Biases logging; metrics.jsonl is always written."""
    if not cfg.wandb:
        return None
    import wandb  # importable: checked in _validate

    return wandb.init(project=cfg.wandb, name=out.name, config=resolved, dir=str(out))


def _epoch_tokens(loader: StoreLoader, epoch: int, dp: bool) -> int:
    """Tokens this rank consumes in an epoch; equal on every data-parallel rank (the minimum)."""
    n = loader.epoch_tokens(epoch)
    return over_ranks(n, "min") if dp else n


_DIVERGED_FIX = "nothing of this step was saved: lower --lr (or keep --grad-clip on) and train again with --overwrite"


def _stop(error: str, world: int) -> None:
    """Raise a refusal that every rank meets together (said once under torchrun)."""
    raise collective(UserError(error)) if world > 1 else UserError(error)


def _diverged(lines: list[dict], step: int) -> str | None:
    bad = next((ln for ln in lines if not all(math.isfinite(ln[k]) for k in _LOSSES)), None)
    if bad is None:
        return None
    losses = ", ".join(f"{k} {bad[k]}" for k in _LOSSES)
    return f"{bad['layer']} diverged at step {step:,} ({losses}); {_DIVERGED_FIX}"


def _checkpoint(out: Path, trainers, step, epoch, offset, tokens_seen, rank, world, dp) -> None:
    """Save every layer's state and publish its SAE. Weights that are no longer finite (an update that
    blew up after a finite loss) are saved nowhere: every rank stops first."""
    broken = next((n for n, t in trainers.items() if not all(bool(torch.isfinite(p).all()) for p in t.sae.parameters())),
                  None)
    error = None if broken is None else f"{broken} diverged at step {step:,} (its weights are no longer finite); {_DIVERGED_FIX}"
    if error := any_error(error, world if not dp else 1):
        _stop(error, world)
    root = ckpt.ckpt_root(out)
    if not dp or rank == 0:
        for name, t in trainers.items():
            ckpt.save_layer(root / f"step_{step}" / name, t.sae, t.opt, t.since_fired)
            ckpt.publish_sae(out / name, t.sae)
    barrier()
    if rank == 0:
        ckpt.write_state(root, step, {"step": step, "epoch": epoch, "epoch_tokens": offset, "tokens_seen": tokens_seen})
        ckpt.publish(root, step)
        shutil.rmtree(ckpt.replaced_path(out), ignore_errors=True)  # the run --overwrite replaced, if any
    barrier()


def _evaluate(cfg, resolved, trainers, store, out, rank, world, dp, device) -> dict[str, float]:
    hold = resolved["holdout_chunks"]
    mine = {} if (dp and rank != 0) else {n: t.sae for n, t in trainers.items()}
    fvu = heldout_fvu(mine, store, hold, batch_size=resolved["loader_batch"], device=device,
                      exclude_first_tokens=cfg.exclude_first_tokens, exclude_token_ids=cfg.exclude_token_ids) if hold else {}
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, fvu)
        fvu = {k: v for g in gathered for k, v in g.items()}
    fvu = {n: fvu[n] for n in resolved["layers"] if n in fvu}
    if rank == 0 and fvu:
        atomic_write(out / "eval.json", json.dumps({"heldout_fvu": fvu, "holdout_chunks": hold}, indent=2))
    return fvu
