"""The bad-input catalogue (docs/errors.md): every case exits 2 with one line that
names the key, file or line, prints no traceback, and changes nothing already written. A case whose arguments
start with ``cl-report`` runs cl-report instead of cl-run."""

from __future__ import annotations

import fcntl
import json
from contextlib import contextmanager

import pytest
import torch
from bad_files import write_data_files, write_model_dirs
from helpers import snapshot, write_jsonl
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig

from cl_runner import cli, report_cli
from cl_runner.models.load import train_tokenizer

ONE = "{name:t,path:json,data_files:{train:%s,test:%s},input_column:question,target_column:answer%s}"


def task(file: str, extra: str = "") -> str:
    return "tasks.tasks=[" + ONE % (file, file, extra) + "]"


def csv_task(file: str) -> str:
    return task(file).replace("path:json", "path:csv")


CASES = [
    # --- config
    ("unknown strategy", ["strategy=bogus"], "strategy=bogus: unknown option; expected one of"),
    ("unknown key", ["train.bogus=1"], "train.bogus: unknown key"),
    ("unknown key added with +", ["+strategy.foo=1"], "strategy.foo: unknown key"),
    ("misspelt strategy option", ["strategy=replay", "strategy.buffer_sise=4"],
     "strategy.buffer_sise: unknown key; did you mean strategy.buffer_size? (see docs/"),
    ("misspelt task key added with +", ["+tasks.tasks.0.templat=x"],
     "tasks.tasks.0.templat: unknown key; did you mean tasks.tasks.0.template? (see docs/"),
    ("wrong type", ["train.lr=abc"], "train.lr: expected a float, got 'abc'"),
    ("wrong bool", ["train.keep_best=maybe"], "train.keep_best"),
    ("negative lr", ["train.lr=-1"], "train.lr: expected a positive number"),
    ("zero batch", ["train.batch_size=0"], "train.batch_size: expected a positive number"),
    ("batch not a multiple of accumulation", ["train.grad_accum=3"], "train.batch_size: must be a multiple"),
    ("warmup out of range", ["train.warmup_ratio=1.5"], "train.warmup_ratio: expected a value in [0, 1)"),
    ("negative seed", ["seed=-1"], "seed: expected a non-negative integer"),
    ("fp16 on cpu", ["device=cpu", "device.precision=fp16"], "device.precision: fp16 needs a GPU"),
    ("unknown metric", ["tasks.tasks.0.metric=bleu"], "tasks.tasks.0.metric: expected one of"),
    ("bad value in one sweep job", ["-m", "train.lr=1e-3,-2"], "train.lr: expected a positive number, got -2"),
    ("replay buffer of 0", ["strategy=replay", "strategy.buffer_size=0"], "strategy.buffer_size: expected a pos"),
    ("negative ewc lambda", ["strategy=ewc", "strategy.ewc_lambda=-1"], "strategy.ewc_lambda: expected a non-neg"),
    ("unknown sampling", ["strategy=replay", "strategy.sampling=fancy"], "strategy.sampling: expected one of"),
    ("option of another strategy", ["strategy=naive", "strategy.buffer_size=9"], "strategy.buffer_size: unknown key"),
    ("keep no checkpoint", ["checkpoint.keep_last=0"], "checkpoint.keep_last: expected a positive number"),
    ("duplicate task names", ["tasks.tasks.1.name=color"], "tasks.tasks: task name 'color' is used twice"),
    ("task of a catalogue sequence by position", ["tasks=standard_order1", "tasks.tasks.0.max_eval_examples=3"],
     "tasks.tasks.0.max_eval_examples: this sequence's tasks come from conf/tasks/catalogue and cannot be changed by "
     "position; change one by name: tasks.catalogue.<task>.<key>=..."),
    ("plugin strategy class that is not one", ["strategy._target_=cl_runner.scoring.cl_metrics.summarize"],
     "strategy._target_: cl_runner.scoring.cl_metrics.summarize is not a Strategy subclass that sets name and Config"),
    ("unwritable output dir", ["hydra.run.dir=/proc/cl-run-test"], "hydra.run.dir: cannot write to /proc/cl-run"),
    ("max_length beyond the model's context", ["train.max_length=4096"], "train.max_length: 4096 exceeds the model"),
    ("task without name", ["tasks.tasks=[{path:json,data_files:{train:good.jsonl,test:good.jsonl}}]"],
     "tasks.tasks.0.name: required, and not set"),
    ("sequence without name", ["tasks.name=???"], "tasks.name: required, and not set"),
    ("catalogue task without name", ["tasks=standard_order1", "tasks.catalogue.dbpedia.name=???"],
     "tasks.catalogue.dbpedia.name: required, and not set"),
    ("comma list without -m", ["strategy=replay,ewc"],
     "strategy=replay,ewc: a comma list (or range, glob) is a sweep over several runs; run it with -m"),
    ("range without -m", ["seed=range(0,3)"], "seed=range(0,3): a comma list (or range, glob) is a sweep"),
    ("glob sweep with a bad job", ["-m", "strategy=glob(*)", "strategy.buffer_size=0"],
     "strategy.buffer_size: unknown key"),  # the glob is expanded: its first option (adapters) has no buffer
    ("glob sweep matching nothing", ["-m", "strategy=glob(zzz*)"], "strategy=glob(zzz*): the sweep has no values"),
    ("null for a string", ["tasks.tasks.0.target_column=null"],
     "tasks.tasks.0.target_column: expected a string, got null"),
    ("null for a number", ["train.lr=null"], "train.lr: expected a number, got null"),
    ("null for an integer", ["seed=null"], "seed: expected an integer, got null"),
    ("null in a task list", [task("good.jsonl").replace("target_column:answer", "target_column:null")],
     "tasks.tasks: target_column: expected a string, got null"),
    ("unquoted value the grammar rejects", ["model.name_or_path=/a b/c#1"],
     "model.name_or_path: cannot parse the value '/a b/c#1' (spaces and characters such as # ! & ; ( ) need quotes); "
     "quote it: model.name_or_path='/a b/c#1'"),
    # --- data
    ("missing data file", [task("nope.jsonl")], "tasks.tasks.0.data_files.train: file not found: {tmp}/nope.jsonl"),
    ("empty data file", [task("empty.jsonl")], "tasks.tasks.0.data_files.train: file is empty: {tmp}/empty.jsonl"),
    ("malformed jsonl line", [task("broken.jsonl")], "tasks.tasks.0.data_files: {tmp}/broken.jsonl line 3 is not"),
    ("jsonl string never closed", [task("unterminated.jsonl")],  # the reason whole: never "...starting at)"
     "tasks.tasks.0.data_files: {tmp}/unterminated.jsonl line 3 is not valid JSON (Invalid control character at "
     "column 23; a value holds a line break, which JSON writes as \\n)"),
    ("missing column", [task("nocol.jsonl")], "tasks.tasks.0.target_column: column 'answer' not in"),
    ("label outside the label set", [task("good.jsonl", ",verbalizer:{yes:Y,no:N},metric:label_accuracy")],
     "tasks.tasks.0.verbalizer: train row 0 has label 'paris', not one of yes, no"),
    ("empty target", [task("blank.jsonl")], "tasks.tasks.0.target_column: validation row 0 has an empty target"),
    ("template placeholder that is no column", [task("good.jsonl", ",template:'{context} {input}'")],
     "tasks.tasks.0.template: placeholder {context} is not a column"),
    ("unknown split", [task("good.jsonl", ",test_split:dev")], "tasks.tasks.0.test_split: split 'dev' not in json"),
    ("target longer than max_length", [task("good.jsonl"), "train.max_length=2"],
     "train.max_length: task 't' has a train target of 2 tokens (with EOS), which leaves no room"),
    # --- model
    ("missing model directory", ["model.name_or_path=/does/not/exist"], "model.name_or_path: directory not found"),
    ("model directory without tokenizer", ["model.name_or_path={tmp}/no-tok"], "model.name_or_path: no tokenizer"),
    ("not a causal LM", ["model.name_or_path={tmp}/vit"], "model.name_or_path: '{tmp}/vit' is a 'vit' model, not a "
                                                           "causal LM or encoder-decoder"),
    ("built model without model_type", ["~model.arch.model_type"], "model.arch.model_type: required"),
    # --- data (round two): what datasets reports as "An error occurred while generating the dataset"
    ("data file not UTF-8", [task("latin1.jsonl")],
     "tasks.tasks.0.data_files: {tmp}/latin1.jsonl line 3 is not UTF-8 text (byte 0xe9"),
    ("csv file not UTF-8", [csv_task("latin1.csv")], "tasks.tasks.0.data_files: {tmp}/latin1.csv line 3 is not UTF-8"),
    ("data file of blank lines", [task("blank_lines.jsonl")],
     "tasks.tasks.0.data_files: {tmp}/blank_lines.jsonl has no rows (only blank lines)"),
    ("header-only csv", [csv_task("header_only.csv")],
     "tasks.tasks.0.data_files: {tmp}/header_only.csv has a header (line 1) but no rows"),
    ("ragged csv row", [csv_task("ragged.csv")],
     "tasks.tasks.0.data_files: {tmp}/ragged.csv line 3 has 3 fields, the header (line 1) has 2"),
    ("jsonl line that is a list", [task("list_line.jsonl")],
     "tasks.tasks.0.data_files: {tmp}/list_line.jsonl line 3 is not a JSON object but a list"),
    ("jsonl line that is a string", [task("string_line.jsonl")],
     "tasks.tasks.0.data_files: {tmp}/string_line.jsonl line 3 is not a JSON object but a string"),
    ("jsonl line that is a number", [task("number_line1.jsonl")],
     "tasks.tasks.0.data_files: {tmp}/number_line1.jsonl line 1 is not a JSON object but a number"),
    ("30 MB line", [task("long_line.jsonl")],
     "tasks.tasks.0.data_files: {tmp}/long_line.jsonl line 3 is longer than 10 MiB, the most one row may hold"),
    # --- model (round two): model directories, model.arch, other numbers, strategy options that name parts
    ("truncated safetensors", ["model.name_or_path={tmp}/model-truncated"],
     "model.name_or_path: {tmp}/model-truncated/model.safetensors is damaged or truncated"),
    ("garbage safetensors", ["model.name_or_path={tmp}/model-garbage"],
     "model.name_or_path: {tmp}/model-garbage/model.safetensors is damaged or truncated"),
    ("config shapes that do not fit the weights", ["model.name_or_path={tmp}/model-shapes"],
     "model.name_or_path: the weights in {tmp}/model-shapes do not fit its config.json (transformer."),
    ("corrupt config.json", ["model.name_or_path={tmp}/model-bad-config"],
     "model.name_or_path: {tmp}/model-bad-config/config.json is not valid JSON (line 1"),
    ("corrupt tokenizer.json", ["model.name_or_path={tmp}/model-bad-tokenizer"],
     "model.name_or_path: {tmp}/model-bad-tokenizer/tokenizer.json is not valid JSON (line 1"),
    ("model.arch key typo", ["+model.arch.n_layers=6"],
     "model.arch.n_layers: not an option of GPT2Config (gpt2); did you mean 'n_layer'?"),
    ("negative layer count", ["model.arch.n_layer=-1"], "model.arch.n_layer: expected a positive integer"),
    ("model.arch value of the wrong type", ["model.arch.n_head=two"], "model.arch: GPT2Config rejects these values"),
    ("unknown architecture", ["model.arch.model_type=gpt3"], "model.arch.model_type: unknown architecture 'gpt3'"),
    ("lr nan", ["train.lr=nan"], "train.lr: expected a positive number, got nan"),
    ("lr inf", ["train.lr=inf"], "train.lr: expected a positive number, got inf"),
    ("seed beyond 64 bits", ["seed=18446744073709551616"], "seed: expected a non-negative integer, at most"),
    ("penalised_params matching no parameter", ["strategy=ewc", "strategy.penalised_params=nomatch"],
     "strategy.penalised_params: 'nomatch' matches no trainable parameter name"),
    ("penalised_params of ewc_replay matching nothing", ["strategy=ewc_replay", "strategy.penalised_params=nomatch"],
     "strategy.penalised_params: 'nomatch' matches no trainable parameter name"),
    ("target_modules matching no module", ["strategy=adapters", "strategy.target_modules=[nope]"],
     "strategy.target_modules: 'nope' matches no module"),
    ("target_modules naming a layer LoRA cannot adapt", ["strategy=shared_lora", "strategy.target_modules=[ln_f]"],
     "strategy.target_modules: 'ln_f' is a LayerNorm, which LoRA cannot adapt"),
    # --- resume
    ("resume a directory that is no run", ["resume={tmp}"], "resume: {tmp} is not a cl-run run directory"),
    ("resume with overrides", ["resume={tmp}/done", "train.lr=1"], "resume: train.lr cannot change on resume"),
    ("resume=null", ["resume=null"], "resume: expected the path of a run directory, got 'null'"),
    ("resume= (empty)", ["resume="], "resume: expected the path of a run directory, got 'nothing'"),
    ("resume a directory that does not exist", ["resume={tmp}/nowhere"], "resume: {tmp}/nowhere is not a cl-run run"),
    ("resume a read-only run", ["resume={tmp}/readonly"], "resume: {tmp}/readonly is read-only; make it writable"),
    ("resume a run in use", ["resume={tmp}/busy"], "run directory {tmp}/busy is in use by another cl-run"),
    ("resume a run whose saved config is invalid", ["resume={tmp}/badcfg"],
     "resume: {tmp}/badcfg/config.yaml: train.lr: expected a positive number"),
    # --- output directory (round two): a refused start changes no byte of an existing run
    ("run dir holding another experiment", ["train.lr=0.01", "hydra.run.dir={tmp}/run"],
     "{tmp}/run already holds a different experiment (its config.yaml differs)"),
    ("run dir in use by another cl-run", ["hydra.run.dir={tmp}/busy"],
     "run directory {tmp}/busy is in use by another cl-run"),
    ("bad value aimed at an existing run", ["train.lr=-1", "hydra.run.dir={tmp}/run"], "train.lr: expected a positive"),
    ("bad data aimed at an existing run", [task("nope.jsonl"), "hydra.run.dir={tmp}/run"],
     "{tmp}/run already holds a different experiment"),
    ("bad data aimed at a run in use", [task("nope.jsonl"), "hydra.run.dir={tmp}/busy"],
     "run directory {tmp}/busy is in use by another cl-run"),
    ("bad data in a fresh run under new directories", [task("nope.jsonl"), "hydra.run.dir=new/a/b"],
     "tasks.tasks.0.data_files.train: file not found"),  # new/, new/a/ and new/a/b/ are removed again
    ("bad data in an empty directory", [task("nope.jsonl"), "hydra.run.dir={tmp}/empty"],
     "tasks.tasks.0.data_files.train: file not found"),  # the directory stays, empty
    ("run dir that is a file", ["hydra.run.dir={tmp}/good.jsonl"], "hydra.run.dir: cannot write to {tmp}/good.jsonl"),
    ("run dir under a file", ["hydra.run.dir={tmp}/good.jsonl/x"], "hydra.run.dir: cannot write to {tmp}/good.jsonl/x"),
    # --- monitors (tasks.monitor, docs/monitors.md)
    ("unknown monitor key", ["+tasks.monitor.m={bogus: 1}"], "tasks.monitor.m.bogus: unknown key"),
    ("monitor that is not a mapping", ["+tasks.monitor.m=5"], "tasks.monitor.m: expected a mapping of options"),
    ("monitor named as a task of the sequence", ["+tasks.monitor.color={source: facts, relation: color}"],
     "tasks.monitor.color: 'color' is a task of the sequence (trained)"),
    ("monitor given epochs", ["+tasks.monitor.m={source: facts, relation: color, epochs: 2}"],
     "tasks.monitor.m.epochs: a monitor is never trained"),
    ("task key on an lm_eval monitor", ["+tasks.monitor.m={lm_eval: mmlu, path: json}"],
     "tasks.monitor.m.path: not used by an lm_eval monitor"),
    ("lm_eval key on a task monitor", ["+tasks.monitor.m={source: facts, relation: color, limit: 5}"],
     "tasks.monitor.m.limit: only for lm_eval monitors"),
    ("negative lm_eval limit", ["+tasks.monitor.m={lm_eval: mmlu, limit: -5}"],
     "tasks.monitor.m.limit: expected a positive number"),
    ("monitor data file missing", ["+tasks.monitor.m={path: json, data_files: {test: nope.jsonl}, train_split: test}"],
     "tasks.monitor.m.data_files.test: file not found"),
    ("lm_eval include_path missing", ["+tasks.monitor.m={lm_eval: mine, include_path: nowhere}"],
     "tasks.monitor.m.include_path: not a folder of lm-eval task YAMLs"),
    # --- round three: no input silently reinterpreted, no weak message
    ("jsonl value that is a list", [task("list_value.jsonl")],
     "tasks.tasks.0.data_files: {tmp}/list_value.jsonl line 3: column 'question' holds a list, not text"),
    ("jsonl target that is a mapping", [task("dict_value.jsonl")],
     "tasks.tasks.0.data_files: {tmp}/dict_value.jsonl line 3: column 'answer' holds a mapping, not text"),
    ("JSON document with a list value", [task("list_value.json")],
     "tasks.tasks.0.input_column: split 'train' of {tmp}/list_value.json, row 3: column 'question' holds a list"),
    ("tokenizer smaller than its byte symbols", ["model.tokenizer_vocab_size=10"],
     "model.tokenizer_vocab_size: expected at least 257 (the trained BPE's 256 byte symbols and EOS), got 10"),
    ("deleted required group", ["~train"], "train: cannot be deleted (~train); every run needs it"),
    ("deleted seed", ["~seed"], "seed: cannot be deleted (~seed)"),
    ("task file with a null column", ["-cd", "{tmp}/conf-null-target", "tasks=null_target"],
     "tasks/null_target.yaml: target_column: expected a string, got null"),
    ("csv quote never closed", [csv_task("open_quote.csv")],
     "tasks.tasks.0.data_files: {tmp}/open_quote.csv line 3 opens a quoted value (\") that is never closed"),
    # --- round three: weak messages of the command line
    ("unknown flag", ["--nonsense"], "cl-run: error: --nonsense: unknown option; see cl-run --help"),
    ("flag with a value it does not take", ["--cfg", "bogus"],
     "argument --cfg/-c: invalid choice: 'bogus' (choose from 'job', 'hydra', 'all'); see cl-run --help"),
    ("override without a key", ["=5"], "=5: not an override: the key before '=' is missing (expected key=value"),
    ("number for a config group", ["strategy=5"],
     "strategy: expected the name of a strategy option (a file of conf/strategy/, e.g. strategy=adapters), got 5"),
    # --- several processes started by cl-run itself (distributed.nproc_per_node): refused before any starts
    ("bad key with cl-run's own workers", ["distributed=ddp", "distributed.nproc_per_node=2", "train.bogus=1"],
     "train.bogus: unknown key"),
    ("workers without a distributed kind", ["distributed.nproc_per_node=2"],
     "distributed.nproc_per_node: 2 processes need distributed=ddp or distributed=fsdp"),
    ("no workers", ["distributed=fsdp", "distributed.nproc_per_node=0"],
     "distributed.nproc_per_node: expected a positive number, got 0"),
    ("cuda workers without CUDA", ["distributed=ddp", "distributed.nproc_per_node=2", "device=cuda"],
     "device.type: cuda was requested but no CUDA device is visible"),
    ("distributed run in one plain process", ["distributed=ddp"],
     "distributed.kind: ddp needs one process per device: add distributed.nproc_per_node=<devices>"),
    ("resume a distributed run of unknown size", ["resume={tmp}/distrun"],
     "resume: {tmp}/distrun is a distributed=ddp run whose number of processes was not recorded; resume it with: "
     "torchrun --nproc_per_node=<devices> -m cl_runner resume={tmp}/distrun"),
    # --- cl-report: it writes only where asked, so a refusal writes nothing
    ("cl-report --paper on an empty directory", ["cl-report", "--paper", "{tmp}/empty"],
     "cl-report: error: {tmp}/empty: no runs found"),
    ("cl-report --paper on a directory of no run", ["cl-report", "--paper", "{tmp}/vit"],
     "cl-report: error: {tmp}/vit: no runs found"),
    ("cl-report on a file", ["cl-report", "{tmp}/good.jsonl"], "cl-report: error: {tmp}/good.jsonl: not a directory"),
    ("cl-report on a missing path", ["cl-report", "{tmp}/nowhere"],
     "cl-report: error: {tmp}/nowhere: no such directory"),
    ("cl-report --out that is a file", ["cl-report", "{tmp}/run", "--out", "{tmp}/good.jsonl"],
     "cl-report: error: --out: {tmp}/good.jsonl is a file; name a directory"),
    ("cl-report --out under a file", ["cl-report", "{tmp}/run", "--out", "{tmp}/good.jsonl/report"],
     "cl-report: error: --out: cannot create {tmp}/good.jsonl/report: {tmp}/good.jsonl is a file"),
    ("cl-report --paper --out that is a file", ["cl-report", "--paper", "{tmp}/run", "--out", "{tmp}/good.jsonl"],
     "cl-report: error: --out: {tmp}/good.jsonl is a file"),
    ("cl-report --limit -1", ["cl-report", "{tmp}/run", "--flips", "init:after_t", "--limit", "-1"],
     "cl-report: error: --limit: expected a positive number of examples, got -1"),
    ("cl-report --limit 0", ["cl-report", "{tmp}/run", "--limit", "0"],
     "cl-report: error: --limit: expected a positive number of examples, got 0"),
    ("cl-report --limit that is no number", ["cl-report", "{tmp}/run", "--limit", "x"],
     "cl-report: error: argument --limit: invalid int value: 'x'"),
    ("cl-report unknown option", ["cl-report", "--nonsense", "{tmp}/run"],
     "cl-report: error: unrecognized arguments: --nonsense"),
    ("cl-report unknown sort metric", ["cl-report", "{tmp}/run", "--sort", "bogus"],
     "cl-report: error: --sort: unknown metric 'bogus'"),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good = [{"question": "capital of france?", "answer": "paris"}, {"question": "capital of peru?", "answer": "lima"}]
    write_jsonl(root / "good.jsonl", good)
    (root / "empty.jsonl").write_text("")
    (root / "broken.jsonl").write_text(json.dumps(good[0]) + "\n" + json.dumps(good[1]) + "\n{oops\n")
    write_jsonl(root / "nocol.jsonl", [{"question": "q", "reply": "a"}])
    write_jsonl(root / "blank.jsonl", [good[0], {"question": "q", "answer": "  "}])
    tok = train_tokenizer(["capital of france? paris"] * 5, vocab_size=300)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64)).save_pretrained(root / "no-tok")
    vit = root / "vit"  # an image encoder: neither a causal LM nor an encoder-decoder
    ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(vit)
    tok.save_pretrained(vit)
    torch.save({}, vit / "unused.bin")
    (root / "done").mkdir()
    (root / "done" / "config.yaml").write_text("seed: 0\n")
    (root / "done" / "metrics.json").write_text('{"status": "running"}\n')
    write_runs(root)
    write_data_files(root)
    write_model_dirs(root)
    return root


def write_runs(root):
    """Run directories the cases aim at: ``run`` (an existing run), ``busy`` (one whose lock another process
    holds), ``readonly``, ``badcfg`` (its saved config is invalid) and ``empty``."""
    with initialize_config_dir(str(cli.CONF_DIR), version_base="1.3"):
        config_yaml = OmegaConf.to_yaml(compose("config", overrides=["device=cpu"]), resolve=True)
    for name, text in (("run", config_yaml), ("busy", config_yaml), ("readonly", config_yaml),
                       ("badcfg", config_yaml.replace("lr: 0.003", "lr: -1.0"))):
        run = root / name
        (run / ".hydra").mkdir(parents=True)
        (run / "config.yaml").write_text(text)
        for file in ("config.yaml", "hydra.yaml", "overrides.yaml"):
            (run / ".hydra" / file).write_text(f"# {file} of the run's own start\n- device=cpu\n")
        (run / "metrics.json").write_text('{"status": "interrupted", "average_accuracy": 0.5}\n')
        (run / "history.jsonl").write_text('{"task": 0, "epoch": 1}\n')
        (run / "checkpoints" / "ckpt-000001").mkdir(parents=True)
        (run / "checkpoints" / "ckpt-000001" / "manifest.json").write_text("{}\n")
        (run / "cli.log").write_text("the run's own log\n")
    distrun = root / "distrun"  # a distributed run killed before its metrics.json said on how many processes
    distrun.mkdir()
    with initialize_config_dir(str(cli.CONF_DIR), version_base="1.3"):
        (distrun / "config.yaml").write_text(OmegaConf.to_yaml(compose("config", overrides=["distributed=ddp"]),
                                                               resolve=True))
    (root / "busy" / ".lock").write_text("")
    (root / "readonly").chmod(0o555)
    (root / "empty").mkdir()


@contextmanager
def held_lock(path):
    """The lock of a run directory held as another cl-run would hold it (its own open file, so flock conflicts)."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


MAY_PRINT_MORE = set()  # cases allowed up to 3 lines on stderr (a warning before the error); all others print one


@pytest.mark.parametrize(("case", "args", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(case, args, message, workspace, monkeypatch, capsys):
    if "device=cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is present")
    monkeypatch.chdir(workspace)
    before = snapshot(workspace)
    argv = [a.replace("{tmp}", str(workspace)) for a in args]
    program, main = ("cl-report", report_cli.main) if argv[0] == "cl-report" else ("cl-run", cli.main)
    argv = argv[1:] if program == "cl-report" else argv
    if program == "cl-run" and not any(a.startswith(("hydra.run.dir", "resume", "-m")) for a in argv):
        # each case its own run directory
        argv.append(f"hydra.run.dir=runs/{''.join(c if c.isalnum() else '_' for c in case)}")
    with held_lock(workspace / "busy" / ".lock"), pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert 1 <= len(lines) <= (3 if case in MAY_PRINT_MORE else 1), err
    assert lines[-1].startswith(f"{program}: error: ")
    assert message.replace("{tmp}", str(workspace)) in lines[-1]
    assert "Traceback" not in out + err
    if program == "cl-report":
        assert out == ""  # refused before anything is printed
    assert snapshot(workspace) == before  # nothing written: no byte changed, no file or directory left behind


def test_catalogue_is_large_enough():
    assert len(CASES) >= 129
