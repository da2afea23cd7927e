"""Command-line conventions both tools share (sae_core/cli.py)."""

from __future__ import annotations

import pytest

from sae_core.cli import join_multi_values


@pytest.mark.parametrize(
    "argv, want",
    [
        (["collect", "--hookpoints", "a.*", "b", "--out", "x"], ["collect", "--hookpoints", "a.*,b", "--out", "x"]),
        (["collect", "--hookpoints=a", "b", "c"], ["collect", "--hookpoints=a,b,c"]),
        (["collect", "--hookpoints", "a", "--hookpoints", "b"], ["collect", "--hookpoints", "a", "--hookpoints", "b"]),
        (["fit", "--exclude-token-ids", "0", "1", "--k", "4"], ["fit", "--exclude-token-ids", "0,1", "--k", "4"]),
        (["fit", "--layers", "1", "2"], ["fit", "--layers", "1", "2"]),  # one value: click reports the extra one
        (["fit", "--exclude-token-ids"], ["fit", "--exclude-token-ids"]),
    ],
)
def test_options_with_several_values(argv, want):
    assert join_multi_values(argv) == want


def test_hookpoints_as_several_values(tmp_path, tiny_model_dir, tiny_text_dir):
    """`--hookpoints PATTERN...`: several patterns after one flag, as the issue writes it."""
    from actcache.cli import main
    from sae_core.store import ActivationStore

    out = tmp_path / "s.zarr"
    with pytest.raises(SystemExit) as e:
        main(["collect", "--model", str(tiny_model_dir), "--dataset", str(tiny_text_dir), "--ctx-len", "32",
              "--max-tokens", "64", "--device", "cpu", "--no-progress", "--hookpoints", "model.layers.1.mlp",
              "model.layers.[23].self_attn", "--out", str(out)])
    assert e.value.code in (0, None)
    assert ActivationStore(out).layers == ["model.layers.1.mlp", "model.layers.2.self_attn", "model.layers.3.self_attn"]


def test_empty_layer_spec_is_refused(tmp_path, tiny_model_dir, tiny_text_dir, capsys):
    from actcache.cli import main

    with pytest.raises(SystemExit) as e:
        main(["collect", "--model", str(tiny_model_dir), "--dataset", str(tiny_text_dir), "--layers", ",", "--device", "cpu",
              "--out", str(tmp_path / "s.zarr")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: malformed layer spec ',' (at ''); use e.g. '0-31', '0,4,8', '0-29:2' or 'all'"
    )
    # An empty value (a path option would read it as the current folder): refused by name, for any option.
    for argv in (["collect", "--layers", ""], ["collect", "--out="], ["collect", "--dataset", " "]):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--out", str(tmp_path / "s.zarr")] if "--out=" not in argv else argv)
        flag = argv[1].rstrip("=")
        assert e.value.code == 2 and capsys.readouterr().err.strip() == (
            f"error: {flag} is empty; pass a value, or leave the option out")
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("main_module, argv, message", [
    ("actcache.cli", ["collect", "--bogus"], "No such option: --bogus"),
    ("actcache.cli", ["collect", "--batch-size", "x"], "Invalid value for '--batch-size'"),
    ("actcache.cli", ["info"], "Missing argument 'store'"),
    ("actcache.cli", ["nosuch"], "No such command 'nosuch'"),
    ("saetrain.cli", ["fit", "--k", "1.5"], "Invalid value for '--k'"),
    ("saetrain.cli", ["evaluate"], "Missing argument"),
    ("pipelines.run", ["--bogus", "tiny-debug"], "unrecognized arguments: --bogus"),
    ("pipelines.run", [], "the following arguments are required: recipe"),
])
def test_usage_errors_are_one_line(capsys, main_module, argv, message):
    """Unknown options, values of the wrong type and missing arguments: one line naming the problem and
    where the help is, exit code 2 (not click's and argparse's usage block)."""
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(main_module).main(argv)
    text = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(text.splitlines()) == 1, text
    assert text.startswith(f"error: {message}") and text.endswith(" --help`"), text


def test_help_and_no_arguments_still_show_help(capsys):
    from actcache.cli import main

    with pytest.raises(SystemExit) as e:
        main(["collect", "--help"])
    assert e.value.code == 0 and "--max-tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and "collect" in capsys.readouterr().err  # as click shows it


def test_a_permission_error_is_one_line(capsys):
    """A read-only folder met anywhere (root here ignores permissions, so the error is raised directly)."""
    from sae_core.cli import make_app, run_app

    app = make_app("test")

    @app.command()
    def write(path: str) -> None:
        raise PermissionError(13, "Permission denied", path)

    @app.command()
    def other() -> None:
        pass

    with pytest.raises(SystemExit) as e:
        run_app(app, ["write", "/data/ro/acts.zarr"])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == (
        "error: permission denied to /data/ro/acts.zarr; make it writable by this user or choose another path")


def test_help_and_usage_errors_do_not_wait_for_torch():
    """The CLIs import torch (~5 s) only in a command's body: --help, a usage error, an early Ctrl-C need none of it,
    while the packages still export their API (imported on first use)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from actcache.cli import main as a\n"
        "from saetrain.cli import main as s\n"
        "for main, argv in ((a, ['collect', '--help']), (s, ['fit', '--k']), (a, ['verify', '--help'])):\n"
        "    try: main(argv)\n"
        "    except SystemExit: pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "import sae_core, sae_core.store, actcache, saetrain\n"
        "assert 'torch' not in sys.modules, 'torch imported by a package'\n"
        "from sae_core import Sae, SaeConfig, load_model\n"
        "from sae_core.store import ActivationStore\n"
        "import actcache.collection, saetrain.trainer, sae_core.sae, sae_core.store.verify\n"
        "from actcache import collect, CollectConfig\n"
        "from saetrain import fit, TrainConfig\n"
        "assert actcache.collect is collect and 'torch' in sys.modules and 'Sae' in dir(sae_core)\n"
        "assert sae_core.models.load_model is load_model and saetrain.settings.validate  # submodules as attributes\n"
        "try: sae_core.nothing\n"
        "except AttributeError: pass\n"
        "else: raise AssertionError('sae_core.nothing')\n"
        "for package in (sae_core, sae_core.store, actcache, saetrain):  # every export the thing, not a module\n"
        "    assert not [n for n in package.__all__ if type(getattr(package, n)) is type(sys)], package\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("env, is_collective, printed", [
    ({}, True, "error: no"),                                                     # one process: always said
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, True, "error: no"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, True, ""),              # said by rank 0
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, False, "error (rank 1): no"),  # only this rank met it
    ({"LOCAL_RANK": "1"}, True, "error: no"),                                    # a subprocess of a worker
])
def test_under_torchrun_a_refusal_all_ranks_meet_is_said_once(capsys, monkeypatch, env, is_collective, printed):
    from sae_core.cli import make_app, run_app
    from sae_core.errors import UserError, collective

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    app = make_app("test")

    @app.command()
    def refuse() -> None:
        raise collective(UserError("no")) if is_collective else UserError("no")

    @app.command()
    def other() -> None:
        pass

    with pytest.raises(SystemExit) as e:
        run_app(app, ["refuse"])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == printed


def test_under_torchrun_sigterm_interrupts_as_ctrl_c_once(monkeypatch):
    """torchrun answers Ctrl-C with SIGTERM to its workers a moment later: it interrupts like SIGINT
    (so the worker reports how to resume), later signals are ignored meanwhile, and the handlers
    are restored afterwards."""
    import os
    import signal

    from sae_core.cli import make_app, run_app

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    app = make_app("test")
    seen = []

    @app.command()
    def work() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            seen.append("not interrupted")
        except KeyboardInterrupt:
            seen.append("interrupted")
            os.kill(os.getpid(), signal.SIGINT)  # ignored while the interrupt is handled
            os.kill(os.getpid(), signal.SIGTERM)
            seen.append("reported")
            raise

    @app.command()
    def other() -> None:
        pass

    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    with pytest.raises(SystemExit) as e:
        run_app(app, ["work"])
    assert e.value.code == 130 and seen == ["interrupted", "reported"]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
