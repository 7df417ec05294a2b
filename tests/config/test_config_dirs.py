"""Config directories of one's own (docs/own_configs.md): --config-dir / -cd, hydra.searchpath, ./cl-conf and
$CL_RUNNER_CONFIG_PATH are composed, listed and checked like the package's conf/; the worked example of the docs
runs end to end on files and a model the test makes itself."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import snapshot

from cl_runner import cli
from cl_runner.config.preflight import CONF_DIR, ENV_VAR, preflight, search_path_args

DOC = Path(__file__).resolve().parents[2] / "docs" / "own_configs.md"
MINE = "name: mine\ntasks:\n  - {name: color, source: facts, relation: color, num_subjects: 8, metric: exact_match}\n"
MY_REPLAY = "defaults:\n  - replay\n  - _self_\nbuffer_size: 7\n"


def write_conf(root: Path, sequence: str = MINE) -> Path:
    """A user config directory: a task sequence ``mine`` and a strategy ``my_replay`` built on the built-in."""
    (root / "tasks").mkdir(parents=True)
    (root / "strategy").mkdir()
    (root / "tasks" / "mine.yaml").write_text(sequence)
    (root / "strategy" / "my_replay.yaml").write_text(MY_REPLAY)
    return root


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty launch directory (the cwd) and a user config directory ``conf`` beside it."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    launch = tmp_path / "launch"
    launch.mkdir()
    monkeypatch.chdir(launch)
    return launch, write_conf(tmp_path / "mine")


def route(name: str, conf: Path, launch: Path, monkeypatch) -> list[str]:
    """Make ``conf`` known to cl-run the way ``name`` says; the arguments to add."""
    if name == "cl-conf":
        conf.rename(launch / "cl-conf")
        return []
    if name == "env":
        monkeypatch.setenv(ENV_VAR, f"{launch / 'empty'}{os.pathsep}{conf}")
        (launch / "empty").mkdir()
        return []
    return {"--config-dir": ["--config-dir", str(conf)], "-cd": ["-cd", str(conf)],
            "--config-dir=": [f"--config-dir={conf}"], "hydra.searchpath": [f"hydra.searchpath=[file://{conf}]"]}[name]


ROUTES = ["--config-dir", "-cd", "--config-dir=", "hydra.searchpath", "cl-conf", "env"]


def main_exit(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


# Each refusal names what the user's own files make possible, so that it fails where they are not read.
BAD = [
    (["tasks=mine", "train.bogus=1"], "train.bogus: unknown key"),
    (["tasks=mine", "train.lr=-1"], "train.lr: expected a positive number"),
    (["tasks=mine", "strategy=bogus"], "strategy=bogus: unknown option; expected one of adapters, agem, der, ewc"),
    (["strategy=my_replay", "strategy.buffer_size=0"], "strategy.buffer_size: expected a positive number"),
    (["tasks=mine", "-m", "strategy=my_replay,naive", "strategy.buffer_size=3"], "strategy.buffer_size: unknown key"),
]


@pytest.mark.parametrize("how", ROUTES)
@pytest.mark.parametrize(("args", "message"), BAD, ids=["unknown key", "bad value", "unknown option",
                                                        "bad value in a user strategy", "bad sweep job"])
def test_user_configs_are_checked_like_built_in_ones(project, how, args, message, monkeypatch, capsys):
    launch, conf = project
    argv = [*route(how, conf, launch, monkeypatch), *args]
    before = snapshot(launch.parent)
    code, out, err = main_exit(argv, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("cl-run: error: "), err
    assert message in err
    if "unknown option" in message:
        assert "my_replay" in err  # the user's options are listed with the built-in ones
    assert snapshot(launch.parent) == before  # no run directory, nothing written


@pytest.mark.parametrize("how", ROUTES)
def test_composition_picks_the_users_sequence_and_strategy(project, how, monkeypatch, capsys):
    launch, conf = project
    cli.main([*route(how, conf, launch, monkeypatch), "tasks=mine", "strategy=my_replay", "--cfg", "job"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["tasks"]["name"] == "mine" and [t["name"] for t in cfg["tasks"]["tasks"]] == ["color"]
    assert cfg["strategy"]["name"] == "replay" and cfg["strategy"]["buffer_size"] == 7  # extends the built-in
    assert cfg["strategy"]["sampling"] == "reservoir"


def test_a_directory_named_with_quotes_commas_and_backslashes(tmp_path, capsys):
    """Each directory is one quoted item of Hydra's override grammar, whatever its name."""
    conf = write_conf(tmp_path / "it's, a\\dir\\")
    cli.main(["-cd", str(conf), "tasks=mine", "--cfg", "job"])
    assert yaml.safe_load(capsys.readouterr().out)["tasks"]["name"] == "mine"


def test_help_lists_the_users_options(project, capsys):
    _, conf = project
    code, out, _ = main_exit(["-cd", str(conf), "tasks=mine", "--help"], capsys)
    groups = dict(line.split(": ", 1) for line in out.split("== Config ==")[0].splitlines() if ": " in line)
    assert code == 0 and "mine" in groups["tasks"].split(", ") and "standard_order1" in groups["tasks"]
    assert "my_replay" in groups["strategy"].split(", ")
    assert "name: mine" in out.split("== Config ==")[1]


def test_directories_are_searched_in_the_documented_order(tmp_path, monkeypatch):
    dirs = {name: write_conf(tmp_path / name, MINE.replace("name: mine", f"name: from_{name}"))
            for name in ("cd", "searchpath", "env1", "env2")}
    write_conf(tmp_path / "cl-conf", MINE.replace("name: mine", "name: from_cl_conf"))
    env = {ENV_VAR: f"{dirs['env1']}{os.pathsep}{dirs['env2']}{os.pathsep}{CONF_DIR}"}
    rest, (search,) = search_path_args(["seed=1", f"hydra.searchpath=[{dirs['searchpath']}]", "-cd", str(dirs["cd"]),
                                        "-m", f"hydra.searchpath=[file://{dirs['cd']}]"], cwd=tmp_path, env=env)
    assert rest == ["seed=1", "-m"]
    order = re.findall(r"file://([^']+)", search)
    assert order == [str(p) for p in (dirs["cd"], dirs["searchpath"], tmp_path / "cl-conf", dirs["env1"],
                                      dirs["env2"])]  # given once each; conf/ itself is always searched first
    for first, expected in ((["-cd", str(dirs["cd"])], "from_cd"), ([], "from_cl_conf")):
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv(ENV_VAR, env[ENV_VAR])
        _, (search,) = search_path_args(first)
        assert preflight(["tasks=mine", search], multirun=False).overrides == ["tasks=mine", search]
        done = subprocess.run([sys.executable, "-m", "cl_runner", *first, "tasks=mine", "--cfg", "job"],
                              capture_output=True, text=True, timeout=120)
        assert yaml.safe_load(done.stdout)["tasks"]["name"] == expected, done.stderr


def test_a_glob_sweep_matches_the_users_options(project):
    _, conf = project
    _, search = search_path_args(["-cd", str(conf)])
    assert preflight(["strategy=glob(my_*)", *search]).overrides == ["strategy=my_replay", *search]
    everything = preflight(["strategy=glob(*)", *search]).overrides[0].split("=")[1].split(",")
    assert {"my_replay", "naive", "replay", "shared_lora"} <= set(everything) and everything == sorted(everything)


@pytest.mark.slow
def test_a_glob_sweep_over_the_users_options_runs_those_jobs(project, capsys):
    """Hydra's sweeper would expand the glob over its base search path only: cl-run hands it the checked list."""
    launch, conf = project
    cli.main(["-cd", str(conf), "-m", "strategy=glob(my_*)", "tasks=mine", "train.epochs=1", "device=cpu",
              "hydra.sweep.dir=sweep"])
    jobs = sorted(p.name for p in (launch / "sweep").iterdir() if p.is_dir())
    assert jobs == ["0_device=cpu,strategy=my_replay,tasks=mine,train.epochs=1"]
    metrics = json.loads((launch / "sweep" / jobs[0] / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["config"]["strategy"]["buffer_size"] == 7


@pytest.mark.parametrize(("name", "message"), [
    ("strategy/replay.yaml", "strategy/replay.yaml: cl-run has a built-in strategy/replay.yaml, which Hydra would "
                             "use instead; give yours another name (e.g. strategy/my_replay.yaml)"),
    ("tasks/default.yaml", "tasks/default.yaml: cl-run has a built-in tasks/default.yaml"),
    ("config.yaml", "config.yaml: the root config is always cl-run's own; put the settings of a whole run in "
                    "experiment/NAME.yaml"),
])
@pytest.mark.parametrize("how", ["--config-dir", "cl-conf", "env"])
def test_a_user_file_with_a_built_in_name_is_refused(project, how, name, message, monkeypatch, capsys):
    """Hydra reads conf/ first: the user's file would be ignored without a word."""
    launch, conf = project
    (conf / name).parent.mkdir(exist_ok=True)
    (conf / name).write_text(MINE.replace("name: mine", "name: shadowed"))
    argv = [*route(how, conf, launch, monkeypatch), "tasks=mine"]
    before = snapshot(launch.parent)
    code, _, err = main_exit(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert snapshot(launch.parent) == before


@pytest.mark.parametrize(("argv", "env", "message"), [
    (["--config-dir", "nodir"], None, "--config-dir: directory not found: {launch}/nodir"),
    (["-cd"], None, "-cd: expected a directory after it"),
    (["hydra.searchpath=[file:///no/such/dir]"], None, "hydra.searchpath: directory not found: /no/such/dir"),
    (["hydra.searchpath=file:///x"], None, "hydra.searchpath: expected a list of directories"),
    (["hydra.searchpath=[pkg://no_such_package.conf]"], None, "hydra.searchpath: package not found"),
    ([], "nodir", f"{ENV_VAR}: directory not found: {{launch}}/nodir"),
])
def test_a_missing_directory_is_one_line(project, argv, env, message, monkeypatch, capsys):
    launch, _ = project
    if env:
        monkeypatch.setenv(ENV_VAR, env)
    code, _, err = main_exit(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"cl-run: error: {message.format(launch=launch)}"), err


def test_resume_ignores_config_directories(project, capsys):
    """A run's config.yaml is complete: ./cl-conf or --config-dir beside resume= is no override to refuse."""
    launch, conf = project
    conf.rename(launch / "cl-conf")
    code, _, err = main_exit(["-cd", str(launch / "cl-conf"), f"resume={launch}"], capsys)
    assert code == 2 and f"resume: {launch} is not a cl-run run directory (no config.yaml)" in err, err


# --- the worked example of docs/own_configs.md, as the page shows it
def doc_example() -> tuple[dict[str, str], str]:
    """``{path: text}`` of the example's files (each block's first line names its file) and its command."""
    section = DOC.read_text().split("## Bring your own model and data", 1)[1]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    files = {m.group(1): text for _, text in blocks if (m := re.match(r"# (\S+\.(?:yaml|py)):", text))}
    (command,) = [text.strip() for lang, text in blocks if lang == "bash"]
    return files, command


def test_the_doc_example_is_complete():
    files, command = doc_example()
    assert set(files) == {"cl-conf/tasks/my_sequence.yaml", "cl-conf/model/my_llama.yaml", "make_example.py"}
    assert command.startswith("cl-run tasks=my_sequence model=my_llama ") and "\n" not in command
    paths = {p for p in re.findall(r"\b((?:data|models)/[\w./-]+)", files["cl-conf/tasks/my_sequence.yaml"]
                                                                      + files["cl-conf/model/my_llama.yaml"])}
    assert {p.rsplit(".", 1)[-1] for p in paths} >= {"jsonl", "csv", "parquet"}


@pytest.mark.slow
def test_bring_your_own_model_and_data_runs_as_documented(tmp_path, monkeypatch, capsys):
    files, command = doc_example()
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    made = subprocess.run([sys.executable, "make_example.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert made.returncode == 0, made.stderr
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    cli.main(command.split()[1:])  # the documented command, in this process (./cl-conf found by convention)
    out = capsys.readouterr().out
    assert "cl-run naive on my_sequence (3 tasks: reviews, capitals, notes)" in out
    (run_dir,) = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["name_or_path"] == "./models/my-llama" and config["tasks"]["name"] == "my_sequence"
    assert [t["path"] for t in config["tasks"]["tasks"]] == ["json", "csv", "parquet"]
    with open(run_dir / "accuracy_matrix.csv") as handle:
        header, *rows = [line.strip().split(",") for line in handle]
    assert header == ["stage", "reviews", "capitals", "notes"] and len(rows) == 4
    assert all(v != "" for row in rows for v in row[1:])
    hydra_cfg = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())
    assert hydra_cfg["hydra"]["searchpath"] == [f"file://{tmp_path.resolve() / 'cl-conf'}"]
