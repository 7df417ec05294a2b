"""engine/assembly.py: what is checked before the model loads (a real model takes minutes to load)."""

from __future__ import annotations

import pytest
from helpers import make_config

from cl_runner.core.errors import ConfigError
from cl_runner.engine import assembly


def test_a_chat_template_the_tokenizer_lacks_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the tasks were encoded")

    monkeypatch.setattr(assembly, "load_model", must_not_load)
    cfg = make_config("tasks.chat_template=true")  # model=tiny trains a BPE tokenizer: it has no chat template
    with pytest.raises(ConfigError, match=r"^tasks\.tasks\.0\.chat_template: the tokenizer .*has no chat template"):
        assembly.build_parts(cfg, tmp_path / "run", None)
