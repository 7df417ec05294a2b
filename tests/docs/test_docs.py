"""The docs: the site builds strictly (no broken link or anchor, no missing include), the README stays a short front
door with the two set-up commands first, and every strategy and every option in conf/ is documented."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README_LIMIT = 12_000


def test_site_builds_strictly(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
               "--site-dir", str(tmp_path / "site")]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_readme_is_a_short_front_door() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme) < README_LIMIT, f"README.md has {len(readme)} characters; move reference material to docs/"
    first_block = re.search(r"```[^\n]*\n(.*?)```", readme, re.S)
    assert first_block, "README.md has no fenced code block"
    assert "cl-run" in first_block.group(1) and "pytest" in first_block.group(1)
    assert "install_texts" in readme
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def strategy_names() -> list[str]:
    """Every built-in strategy, as the registry finds them (nothing to edit here when one is added)."""
    from cl_runner.strategies.registry import builtin_strategies

    return sorted(builtin_strategies())


def test_every_strategy_has_a_section_on_a_strategy_page() -> None:
    pages = "\n".join(p.read_text(encoding="utf-8") for p in (DOCS / "strategies").glob("*.md"))
    missing = [s for s in strategy_names() if not re.search(rf"^## {re.escape(s)}$", pages, re.M)]
    assert not missing, f"no '## <name>' section in docs/strategies/ for: {', '.join(missing)}"


def documented_keys() -> str:
    return (DOCS / "configuration.md").read_text(encoding="utf-8")


def option_keys(path: Path, prefix: str) -> list[str]:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return [f"{prefix}{k}" for k in data if k not in ("defaults", "name")]


def test_every_option_in_conf_is_in_the_configuration_reference() -> None:
    reference = documented_keys()
    keys = []
    root = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text(encoding="utf-8"))
    for key, value in root.items():
        if key == "defaults":
            continue
        keys += [f"{key}.{k}" for k in value] if isinstance(value, dict) else [key]
    keys += option_keys(ROOT / "conf" / "model" / "tiny.yaml", "model.")
    keys += option_keys(ROOT / "conf" / "device" / "auto.yaml", "device.")
    missing = sorted({k for k in keys if f"`{k}`" not in reference})
    assert not missing, f"docs/configuration.md does not document: {', '.join(missing)}"


def strategy_sections() -> dict[str, tuple[dict[str, str], str]]:
    """docs/configuration.md's ``### `name``` sections under ``## `strategy```: name -> ({option: the table's
    default}, the section's prose)."""
    text = documented_keys().split("## `strategy`", 1)[1].split("\n## ", 1)[0]
    sections = {}
    for block in re.split(r"^### ", text, flags=re.M)[1:]:
        title, _, body = block.partition("\n")
        rows = {m[0]: m[1] for m in re.findall(r"^\| `strategy\.(\w+)` \| `([^`]*)` \|", body, re.M)}
        prose = "\n".join(line for line in body.splitlines() if not line.startswith("|"))
        sections[title.strip().strip("`")] = (rows, prose)
    return sections


def yaml_value(text: str) -> object:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(f"v: {text}"))["v"]  # 1.0e5 is a float, as in conf/


def test_every_strategy_option_is_in_its_configuration_table_with_the_config_default() -> None:
    """The Config dataclass is the source of every default. Each option of a strategy is a row of its section (with
    that default), or its section names another strategy whose row has the same default (``as for `replay```), or
    states its own (`` `per_task: true` ``)."""
    from dataclasses import fields

    from cl_runner.strategies.registry import strategy_class

    sections, problems = strategy_sections(), []
    for name in strategy_names():
        defaults = {f.name: getattr(strategy_class(name).Config(), f.name) for f in fields(strategy_class(name).Config)
                    if f.name not in ("name", "_target_")}
        if name not in sections:
            problems += [f"no ### `{name}` section"] if defaults else []
            continue
        rows, prose = sections[name]
        problems += [f"{name}.{k}: a row of no option of {name}" for k in rows if k not in defaults]
        stated = {k: yaml_value(v) for k, v in re.findall(r"`(\w+): ([^`]+)`", prose) if k in defaults}
        named = [other for other in re.findall(r"`(\w+)`", prose) if other in sections and other != name]
        for option, default in defaults.items():
            if option in rows:
                documented = [yaml_value(rows[option])]
            elif option in stated:
                documented = [stated[option]]
            else:
                documented = [yaml_value(sections[o][0][option]) for o in named if option in sections[o][0]]
            if default not in documented:
                problems.append(f"{name}.{option}: the Config default is {default!r}, the docs say {documented}")
    assert not problems, "docs/configuration.md: " + "; ".join(problems)


def test_every_task_key_is_in_the_configuration_reference() -> None:
    from dataclasses import fields

    from cl_runner.config.schema import TaskConfig

    reference = documented_keys()
    missing = [f.name for f in fields(TaskConfig) if f"| `{f.name}` |" not in reference]
    assert not missing, f"docs/configuration.md does not document the task keys: {', '.join(missing)}"


def test_results_tables_are_generated() -> None:
    tables = sorted((DOCS / "results").glob("*.md"))
    assert tables
    for table in tables:
        first = table.read_text(encoding="utf-8").splitlines()[0]
        assert "generated by scripts/docs_results.py" in first and "do not edit" in first, table.name


def declared(setting: str) -> set[str]:
    """The built-in strategies whose class refuses ``setting`` whatever their options."""
    from cl_runner.strategies.registry import builtin_strategies

    return {name for name, cls in builtin_strategies().items()
            if any(r.when is None for r in getattr(cls.supports, setting))}


def row(key: str) -> str:
    return next(line for line in documented_keys().splitlines() if line.startswith(f"| `{key}` |"))


def test_the_reference_lists_the_strategies_each_class_says_cannot_pack_or_run_on_an_encoder_decoder() -> None:
    """Lists of strategy facts in the docs follow the classes (``supports``, cl_runner/strategies/support.py)."""
    names = set(strategy_names())
    assert names & set(re.findall(r"`(\w+)`", row("train.pack"))) == declared("pack")
    paragraph = documented_keys().split("**Encoder-decoder models**", 1)[1].split("\n\n", 1)[0]
    works, refused = paragraph.split("Refused in one line", 1)
    assert names & set(re.findall(r"`(\w+)`", refused)) == declared("encoder_decoder")
    assert not names & set(re.findall(r"`(\w+)`", works)) & declared("encoder_decoder")
    from cl_runner.strategies.registry import builtin_strategies

    per_task = {f"{n}.{o}" for n, c in builtin_strategies().items() for o in c.supports.per_task_options}
    listed = set(re.findall(r"`(\w+)\.(\w+)`", row("strategy_overrides").split("Only the options", 1)[1]))
    assert {f"{n}.{o}" for n, o in listed if n in names} == per_task


def test_readme_and_getting_started_give_the_suite_the_same_time():
    pattern = r"test\s+suite on the CPU \(about (\d+) minutes on 2 cores"
    times = [re.findall(pattern, (path).read_text(encoding="utf-8")) for path in (ROOT / "README.md",
                                                                               DOCS / "getting-started.md")]
    assert times[0] and times[0] == times[1], times
