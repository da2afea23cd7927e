"""Capturing activations with forward hooks, and stopping the forward pass after the last one.

Layer L is captured by a forward *pre*-hook on block L (its input is `hidden_states[L]`);
a hookpoint by a forward hook on the module (its output: `(batch, seq, d)`, or the flattened batch's
`(batch * seq, d)` rows, which OPT's layers work on). Once every target has fired,
the hook raises `_Stop`, so the blocks after the last requested layer never run.
"""

from __future__ import annotations

from fnmatch import fnmatch

import torch
from torch import nn

from sae_core import UserError, decoder_blocks
from sae_core.store import layer_key


class _Stop(Exception):
    pass


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    if hasattr(x, "last_hidden_state"):
        return x.last_hidden_state
    raise TypeError(f"cannot find a tensor in a {type(x).__name__}")


def match_hookpoints(model: nn.Module, patterns: list[str]) -> list[str]:
    """Module paths matching the fnmatch patterns, in module order; containers (a ModuleList of blocks),
    which are never called themselves, are not among them."""
    modules = [(name, m) for name, m in model.named_modules() if name]
    names = [name for name, m in modules if not isinstance(m, (nn.ModuleList, nn.ModuleDict))]
    chosen = [n for n in names if any(fnmatch(n, p) for p in patterns)]
    for p in patterns:
        if not any(fnmatch(n, p) for n in names):
            if found := next(((n, m) for n, m in modules if fnmatch(n, p)), None):
                member = next((n for n in names if n.startswith(found[0] + ".")), f"{found[0]}.0")
                raise UserError(f"hookpoint pattern {p!r} matches only {found[0]}, a {type(found[1]).__name__} of "
                                f"modules, which is never called itself; name its members (e.g. {member!r})")
            raise UserError(f"hookpoint pattern {p!r} matches no module of the model; module paths look like {_example_path(model, names)!r}")
    return chosen


def _example_path(model: nn.Module, names: list[str]) -> str:
    """A module path inside the language model's second block (not a vision tower's), to show the form."""
    try:
        blocks = decoder_blocks(model)
        prefix = next(n for n, m in model.named_modules() if m is blocks) + ".1."
        return next(n for n in names if n.startswith(prefix))
    except Exception:  # noqa: BLE001 - no decoder blocks found: any numbered path
        return next((n for n in names if ".1." in n), names[0])


@torch.inference_mode()
def hidden_states_are_block_outputs(model: nn.Module, device: torch.device) -> bool:
    """Whether the model's `hidden_states[L]` is the output of block L rather than its input: Mamba,
    FalconMamba and RWKV list no embeddings entry. Told by one short forward pass: False when the
    first entry is block 0's input, or when the model cannot say (no `hidden_states`)."""
    seen = {}

    def before(module, args, kwargs) -> None:
        seen.setdefault("in", args[0] if args else kwargs["hidden_states"])

    def after(module, args, output) -> None:
        seen.setdefault("out", _first_tensor(output))

    block = decoder_blocks(model)[0]
    handles = [block.register_forward_pre_hook(before, with_kwargs=True), block.register_forward_hook(after)]
    try:
        first = model(input_ids=torch.ones(1, 4, dtype=torch.long, device=device), output_hidden_states=True,
                      use_cache=False).hidden_states[0]
    except Exception:  # noqa: BLE001 - no hidden_states to compare with: the block-input convention
        return False
    finally:
        for h in handles:
            h.remove()
    same = lambda t: isinstance(t, torch.Tensor) and t.shape == first.shape and torch.equal(t, first)  # noqa: E731
    return not same(seen.get("in")) and same(seen.get("out"))


class Capture:
    """Run the model and return `{array name: (batch, seq, d) tensor}` for the targets."""

    def __init__(self, model: nn.Module, *, layers: list[int] | None = None, hookpoints: list[str] | None = None,
                 block_outputs: bool = False):
        self.model = model
        self.out: dict[str, torch.Tensor] = {}
        self.handles = []
        self.layers = bool(layers)
        if layers:  # hidden_states[L]: block L's input, or its output where the model lists those (see above)
            blocks = decoder_blocks(model)
            self.names = [layer_key(L) for L in layers]
            for L in layers:
                if block_outputs:
                    self.handles.append(blocks[L].register_forward_hook(self._hook(layer_key(L))))
                else:
                    self.handles.append(
                        blocks[L].register_forward_pre_hook(self._pre_hook(layer_key(L)), with_kwargs=True))
        else:
            modules = dict(model.named_modules())
            self.names = list(hookpoints or [])
            for name in self.names:
                self.handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _store(self, name: str, x: torch.Tensor) -> None:
        self.out[name] = x.detach()
        if len(self.out) == len(self.names):
            raise _Stop

    def _pre_hook(self, name: str):
        def hook(module, args, kwargs):
            self._store(name, args[0] if args else kwargs["hidden_states"])

        return hook

    def _hook(self, name: str):
        def hook(module, args, output):
            x = _first_tensor(output)
            if x.dim() == 2 and x.shape[0] == self.tokens[0] * self.tokens[1]:  # rows of the flattened batch (OPT)
                x = x.unflatten(0, self.tokens)
            self._store(name, x)

        return hook

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        self.out = {}
        self.tokens = tuple(input_ids.shape)
        try:
            self.model(input_ids=input_ids, use_cache=False)
        except _Stop:
            pass
        missing = [n for n in self.names if n not in self.out]
        if missing:
            raise UserError(f"the forward pass never reached {', '.join(missing)}: they do not run on text input (a "
                            "vision tower?); pick modules of the language model")
        return self.out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
