"""The bad-input catalogue (docs/errors.md): every case exits 2 with one line that
names the key, file or line, prints no traceback, and changes nothing already written."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import write_jsonl
from transformers import GPT2Config, GPT2LMHeadModel, T5Config

from cl_runner import cli
from cl_runner.models import train_tokenizer

ONE = "{name:t,path:json,data_files:{train:%s,test:%s},input_column:question,target_column:answer%s}"


def task(file: str, extra: str = "") -> str:
    return "tasks.tasks=[" + ONE % (file, file, extra) + "]"


CASES = [
    # --- config
    ("unknown strategy", ["strategy=bogus"], "strategy=bogus: unknown option; expected one of"),
    ("unknown key", ["train.bogus=1"], "train.bogus: unknown key"),
    ("unknown key added with +", ["+strategy.foo=1"], "strategy.foo: unknown key"),
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
    ("plugin strategy class that is not one", ["strategy._target_=cl_runner.metrics.summarize"],
     "strategy._target_: cl_runner.metrics.summarize is not a Strategy subclass that sets name and Config"),
    ("unwritable output dir", ["hydra.run.dir=/proc/cl-run-test"], "hydra.run.dir: cannot write to /proc/cl-run"),
    ("max_length beyond the model's context", ["train.max_length=4096"], "train.max_length: 4096 exceeds the model"),
    # --- data
    ("missing data file", [task("nope.jsonl")], "tasks.tasks.0.data_files.train: file not found: {tmp}/nope.jsonl"),
    ("empty data file", [task("empty.jsonl")], "tasks.tasks.0.data_files.train: file is empty: {tmp}/empty.jsonl"),
    ("malformed jsonl line", [task("broken.jsonl")], "tasks.tasks.0.data_files: {tmp}/broken.jsonl line 3 is not"),
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
    ("not a causal LM", ["model.name_or_path={tmp}/t5"], "model.name_or_path: '{tmp}/t5' is a 't5' model, not a "
                                                          "causal LM"),
    ("built model without model_type", ["~model.arch.model_type"], "model.arch.model_type: required"),
    # --- resume
    ("resume a directory that is no run", ["resume={tmp}"], "resume: {tmp} is not a cl-run run directory"),
    ("resume with overrides", ["resume={tmp}/done", "train.lr=1"], "resume: cannot be combined with overrides"),
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
    t5 = root / "t5"
    T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=len(tok)).save_pretrained(t5)
    tok.save_pretrained(t5)
    torch.save({}, root / "t5" / "unused.bin")
    (root / "done").mkdir()
    (root / "done" / "config.yaml").write_text("seed: 0\n")
    (root / "done" / "metrics.json").write_text('{"status": "running"}\n')
    return root


def snapshot(root):
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("case", "args", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(case, args, message, workspace, monkeypatch, capsys):
    if "device=cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is present")
    monkeypatch.chdir(workspace)
    before = snapshot(workspace)
    argv = [a.replace("{tmp}", str(workspace)) for a in args]
    if not any(a.startswith(("hydra.run.dir", "resume", "-m")) for a in argv):
        # each case its own run directory
        argv.append(f"hydra.run.dir=runs/{''.join(c if c.isalnum() else '_' for c in case)}")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("cl-run: error: ")
    assert message.replace("{tmp}", str(workspace)) in lines[0]
    assert "Traceback" not in out + err
    after = snapshot(workspace)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing already written changed


def test_catalogue_is_large_enough():
    assert len(CASES) >= 25
