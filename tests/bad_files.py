"""Files for the round-two data and model cases of the bad-input catalogue (tests/cli/test_bad_inputs.py) and for
tests/config/test_input_checks.py: each is a small good file with one defect."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import GPT2Config, GPT2LMHeadModel

from cl_runner.models.load import train_tokenizer

GOOD = [{"question": "capital of france?", "answer": "paris"}, {"question": "capital of peru?", "answer": "lima"}]
GOOD_LINES = "".join(json.dumps(row) + "\n" for row in GOOD)


def write_data_files(root: Path) -> None:
    """One defect each; the defect sits on line 3 (row 3) unless the name says otherwise."""
    latin1 = '{"question": "café?", "answer": "x"}\n'.encode("latin-1")
    (root / "latin1.jsonl").write_bytes(GOOD_LINES.encode() + latin1)
    (root / "latin1.csv").write_bytes("question,answer\nq1,a1\ncafé?,a2\n".encode("latin-1"))
    (root / "blank_lines.jsonl").write_text("\n  \n\n")
    (root / "header_only.csv").write_text("question,answer\n")
    (root / "ragged.csv").write_text("question,answer\nq1,a1\nq2,a2,extra\n")
    (root / "list_line.jsonl").write_text(GOOD_LINES + "[1, 2]\n")
    (root / "string_line.jsonl").write_text(GOOD_LINES + '"text"\n')
    (root / "number_line1.jsonl").write_text("3\n" + GOOD_LINES)
    (root / "long_line.jsonl").write_text(GOOD_LINES + json.dumps({"question": "x" * 30_000_000, "answer": "a"}) + "\n")
    (root / "rows.json").write_text(json.dumps(GOOD))  # a JSON document: fine
    # a raw line break inside a value (JSON wants \\n): line 3 ends inside the string
    (root / "unterminated.jsonl").write_text(GOOD_LINES + '{"question": "line one\nline two", "answer": "a3"}\n')
    # values that are no text: datasets would train on their Python repr (round three)
    (root / "list_value.jsonl").write_text(GOOD_LINES + json.dumps({"question": ["a", "b"], "answer": "x"}) + "\n")
    (root / "dict_value.jsonl").write_text(GOOD_LINES + json.dumps({"question": "q", "answer": {"text": "x"}}) + "\n")
    (root / "list_value.json").write_text(json.dumps([*GOOD, {"question": ["a", "b"], "answer": "x"}]))  # row 3
    (root / "open_quote.csv").write_text('question,answer\nq1,a1\n"q2 never closed,a2\nq3,a3\n')
    null_target = root / "conf-null-target" / "tasks"  # a config directory whose task file has a null column
    null_target.mkdir(parents=True)
    (null_target / "null_target.yaml").write_text(
        "name: null_target\ntasks:\n  - name: t\n    path: json\n    data_files: {train: rows.json, test: rows.json}\n"
        "    input_column: question\n    target_column: null\n")


def write_model_dirs(root: Path) -> None:
    """``model-ok`` (a tiny GPT-2 with its tokenizer) and copies of it, each with one damaged file."""
    tok = train_tokenizer(["capital of france? paris"] * 5, vocab_size=300)
    good = root / "model-ok"
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=len(tok))
    GPT2LMHeadModel(config).save_pretrained(good)
    tok.save_pretrained(good)
    for name in ("model-truncated", "model-garbage", "model-shapes", "model-bad-config", "model-bad-tokenizer"):
        shutil.copytree(good, root / name)
    weights = root / "model-truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "model-garbage" / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    saved = json.loads((good / "config.json").read_text())
    (root / "model-shapes" / "config.json").write_text(json.dumps(saved | {"n_embd": 32}))
    (root / "model-bad-config" / "config.json").write_text('{"model_type": "gpt2", "n_embd": 16,')
    (root / "model-bad-tokenizer" / "tokenizer.json").write_text('{"version": "1.0", "trunc')
