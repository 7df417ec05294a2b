"""Start-up: `cl-run --help` and a bad input answer without importing torch (the second it takes is the bulk of
their cost; scripts/bench_startup.py has the timings), and ``cl_runner.core.lazy.defer`` runs a deferred package's
code once, at its first use, also when a submodule is imported first."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from cl_runner.core.lazy import defer, is_loaded

# Runs cl-run's main() and says at exit whether torch's code ran: a real torch module has Tensor in its __dict__
# (vars() reads the __dict__ itself, so asking does not load a deferred module).
PROBE = textwrap.dedent("""
    import atexit, sys
    atexit.register(lambda: print("torch imported:", "Tensor" in vars(sys.modules.get("torch", sys)),
                                  file=sys.stderr))
    sys.argv = ["cl-run", *sys.argv[1:]]
    from cl_runner.cli import main
    main()
""")


@pytest.mark.parametrize("args, code, says", [
    (["--help"], 0, "== Config =="),
    (["train.lr=-1"], 2, "cl-run: error: train.lr: expected a positive number"),
    (["strategy=bogus"], 2, "cl-run: error: strategy=bogus: unknown option"),
])
def test_help_and_bad_inputs_do_not_import_torch(tmp_path, args, code, says):
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == code, done.stderr
    assert says in done.stdout + done.stderr
    assert "torch imported: False" in done.stderr


def test_a_finished_cl_run_runs_exit_handlers_and_flushes_its_output(tmp_path):
    """cl-run exits without the interpreter's teardown (cli._exit_without_teardown), but not without that."""
    done = subprocess.run([sys.executable, "-c", PROBE, "--cfg", "job", "strategy=ewc"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stderr  # the probe's exit handler ran
    assert "ewc_lambda:" in done.stdout


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package ``deferdemo`` with a submodule; every execution of either is appended to ``deferlog.runs``."""
    (tmp_path / "deferlog.py").write_text("runs = []\n")
    (tmp_path / "deferdemo").mkdir()
    (tmp_path / "deferdemo" / "__init__.py").write_text(
        "import deferlog\ndeferlog.runs.append('deferdemo')\nimport deferdemo.sub\nvalue = 42\n")
    (tmp_path / "deferdemo" / "sub.py").write_text("import deferlog\ndeferlog.runs.append('sub')\nvalue = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("deferlog", "deferdemo", "deferdemo.sub"):
        sys.modules.pop(name, None)


def test_a_deferred_package_runs_at_its_first_attribute_read_and_once(package):
    import deferlog

    defer("deferdemo")
    import deferdemo  # an import statement reads __spec__: that must not load it

    assert deferlog.runs == [] and not is_loaded("deferdemo")
    assert deferdemo.value == 42
    assert deferlog.runs == ["deferdemo", "sub"] and is_loaded("deferdemo")
    assert deferdemo.value == 42 and deferlog.runs == ["deferdemo", "sub"]


def test_importing_a_submodule_first_loads_the_package_once_and_the_submodule_once(package):
    import deferlog

    defer("deferdemo")
    import deferdemo.sub

    assert deferlog.runs == ["deferdemo", "sub"]
    assert sys.modules["deferdemo.sub"] is deferdemo.sub and deferdemo.sub.value == 7
    assert deferdemo.sub.__spec__.origin.endswith("sub.py")  # the module's own spec, not the finder's


def test_a_deferred_package_that_fails_to_load_fails_again_at_the_next_import(package, tmp_path):
    (tmp_path / "deferdemo" / "__init__.py").write_text("raise ImportError('broken on purpose')\n")
    defer("deferdemo")
    import deferdemo

    with pytest.raises(ImportError, match="broken on purpose"):
        deferdemo.value  # noqa: B018
    assert "deferdemo" not in sys.modules
    with pytest.raises(ImportError, match="broken on purpose"):
        import deferdemo  # noqa: F401, F811
