"""What each strategy supports is declared on its class (``supports``, cl_runner/strategies/support.py) and checked in
one place: the facts name real options, composites declare their parts' facts, a refusal that depends on the options
applies only to them, per-task options reach the strategy as values, and today's facts are those the central lists
held before (train.pack, encoder-decoder models, distributed kinds, per-task options)."""

from __future__ import annotations

from dataclasses import fields
from types import SimpleNamespace

import pytest

from cl_runner.core.errors import ConfigError
from cl_runner.models.kinds import CAUSAL_LM, EncoderDecoder
from cl_runner.strategies.compose import Composite
from cl_runner.strategies.registry import builtin_strategies, strategy_class
from cl_runner.strategies.support import SETTINGS, Refused, Supports, combined, support_errors

CLASSES = builtin_strategies()


def options(cls: type) -> set[str]:
    return {f.name for f in fields(cls.Config)}


def config(name: str, **values):
    return strategy_class(name).Config(**values)


def refused(setting: str) -> set[str]:
    """The strategies whose class refuses ``setting`` with its default options."""
    return {name for name, cls in CLASSES.items() if cls.supports.refusals(setting, cls.Config())}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_fact_names_an_option_of_its_config(name):
    cls = CLASSES[name]
    assert set(cls.supports.per_task_options) <= options(cls) - {"name", "_target_"}
    for setting in SETTINGS:
        for refusal in getattr(cls.supports, setting):
            assert isinstance(refusal, Refused) and refusal.reason and refusal.option in options(cls)
            refusal.applies(cls.Config())  # its condition reads options the Config has


def composite_configs(name: str) -> list:
    """Configs that build every shape of a composite (merge's part depends on ``over``)."""
    return [config(name, over="full"), config(name, over="lora")] if name == "merge" else [config(name)]


@pytest.mark.parametrize("name", sorted(n for n, c in CLASSES.items() if issubclass(c, Composite)))
def test_a_composite_declares_every_fact_of_its_parts(name):
    cls = CLASSES[name]
    for cfg in composite_configs(name):
        for part in cls(cfg).parts:
            for setting in SETTINGS:
                assert set(getattr(part.supports, setting)) <= set(getattr(cls.supports, setting)), (part, setting)
            assert set(part.supports.per_task_options) <= set(cls.supports.per_task_options)


def test_combined_and_or_keep_every_refusal_once():
    a, b = Refused("a"), Refused("b", option="sampling", when=lambda cfg: cfg.sampling == "hardest")
    one = Supports(pack=a, per_task_options=("x",))
    assert one.pack == (a,)  # a single Refused stands for a tuple of one
    both = one | Supports(pack=(a, b), encoder_decoder=b, per_task_options=("x", "y"))
    assert both == Supports(pack=(a, b), encoder_decoder=(b,), per_task_options=("x", "y"))
    assert combined(CLASSES["ewc"], CLASSES["replay"]) == CLASSES["ewc_replay"].supports


def test_a_refusal_that_depends_on_an_option_applies_only_to_its_values():
    ewc = CLASSES["ewc"]
    assert support_errors(ewc, [config("ewc")], encoder_decoder=True) == []
    assert support_errors(ewc, [config("ewc", fisher="sampled")], encoder_decoder=True) == [
        "strategy.fisher: sampled is not supported with an encoder-decoder model: it samples labels in the causal "
        "layout; use empirical"]
    assert support_errors(ewc, [config("ewc", fisher="sampled")], pack=True, distributed="ddp") == []
    # one config per task: a task's own options can make it refused; each line once
    tasks = [config("adapters"), config("adapters", orthogonal_lambda=0.5), config("adapters", orthogonal_lambda=1)]
    lines = support_errors(CLASSES["adapters"], tasks, distributed="fsdp")
    assert len(lines) == 1 and lines[0].startswith("distributed.kind: strategy adapters cannot run with distributed=")


def test_the_facts_are_those_the_central_lists_held():
    """The lists this replaces (schema.PACK_REFUSED, seq2seq.REFUSED_STRATEGIES and REFUSED_SAMPLINGS,
    task_overrides.PER_TASK_OPTIONS, Strategy.distributed_refusal): the same refusals, by name."""
    assert refused("pack") == {"lwf", "lamol", "prompt_tuning", "progressive_prompts", "ilora", "l2p"}
    by_name = {name for name, cls in CLASSES.items()
               if any(r.option == "name" for r in cls.supports.encoder_decoder)}
    # der, agem, gem and ilora run on encoder-decoders through the model kind (cl_runner/models/kinds.py)
    assert by_name == {"lamol", "progressive", "prompt_tuning", "progressive_prompts", "ogd", "l2p"}
    sampling = {name for name, cls in CLASSES.items() if "sampling" in options(cls)}
    assert sampling == {"replay", "der", "agem", "gem", "mer", "ewc_replay", "ilora"}
    for name in sampling:  # every buffer sampling too (importance and hardest score with the kind's forward)
        cls = CLASSES[name]
        assert not [r for r in cls.supports.refusals("encoder_decoder", cls.Config(sampling="hardest"))
                    if r.option != "name"]
    assert {n for n, c in CLASSES.items() if "fisher" in options(c)} == {"ewc", "ewc_replay"}
    assert refused("ddp") == set() and refused("fsdp") == {"lamol", "l2p"}  # adapters: only with orthogonal_lambda > 0
    assert {n: c.supports.per_task_options for n, c in CLASSES.items() if c.supports.per_task_options} == {
        "adapters": ("orthogonal_lambda",), "lamol": ("lm_lambda",)}


def test_option_is_the_tasks_value_else_the_runs_and_only_for_declared_options():
    strategy = strategy_class("adapters")(config("adapters", orthogonal_lambda=0.5))
    assert strategy.option(SimpleNamespace(options={}), "orthogonal_lambda") == 0.5
    assert strategy.option(SimpleNamespace(options={"orthogonal_lambda": 5.0}), "orthogonal_lambda") == 5.0
    assert strategy.cfg.orthogonal_lambda == 0.5  # the run's options are never overwritten
    with pytest.raises(KeyError, match="rank"):
        strategy.option(SimpleNamespace(options={}), "rank")  # once per run: not a per-task option


def test_a_model_kind_the_config_could_not_tell_is_refused_by_check():
    t5 = SimpleNamespace(kind=EncoderDecoder(start_id=0, pad_id=0, eos_id=1))  # the kind chosen at load
    causal = SimpleNamespace(kind=CAUSAL_LM)
    lamol = strategy_class("lamol")(config("lamol"))
    with pytest.raises(ConfigError, match=r"^strategy.name: lamol is not supported with an encoder-decoder model: "):
        lamol.check(t5)
    lamol.check(causal)
    composite = strategy_class("ewc_replay")(config("ewc_replay", fisher="sampled"))
    with pytest.raises(ConfigError, match=r"^strategy.fisher: sampled is not supported"):
        composite.check(t5)
