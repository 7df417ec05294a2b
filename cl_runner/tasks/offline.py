"""Real offline task sequences: texts that Debian packages ship, written as versioned jsonl files.

Nothing here is generated: every document and fact is an excerpt of an installed text, sampled with a seed.

- Language modelling, domain-incremental (``conf/tasks/offline_lm_domains.yaml``, metric perplexity on held-out
  text): ``definitions`` (GCIDE, the Collaborative International Dictionary of English, package ``dict-gcide``) ->
  ``scripture`` (King James Bible, ``bible-kjv``) -> ``jargon`` (the Jargon File, ``jargon-text``) -> ``python``
  (the Python standard library's own source). Rows ``{"text": ...}`` in ``lm/<domain>/{train,validation,test}.jsonl``.
- Knowledge injection from WordNet 3.0 (``conf/tasks/offline_wordnet_senses.yaml``, package ``wordnet-base``,
  metric exact match): one task per lexicographer domain (noun.animal -> noun.plant -> noun.food -> noun.artifact);
  a fact is "word -> hypernym of the word's sense in that domain". Words are chosen polysemous across the sequence
  first ("squab": a pigeon in noun.animal, poultry in noun.food, a sofa in noun.artifact), so a later domain
  teaches new answers for subjects an earlier one taught, and sequential training overwrites them.
  Rows ``{"word", "domain", "hypernym", "gloss"}`` in ``wordnet/<domain>.jsonl``; ``gloss`` allows a
  "gloss -> word" variant with the same files.

Layout under the data directory (default ``outputs/data``, or ``$CL_DATA_DIR``; the task configs read the same
variable): ``cl-runner-offline-v1/`` holding the files and ``manifest.json`` (seed, sizes, package versions, Python
version, SHA-256 of every file). The same seed and the same installed packages give byte-identical files. A task
config that points into a missing ``cl-runner-offline-v1`` directory builds it on first use (seed 0, default sizes).
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import logging
import os
import platform
import random
import re
import shutil
import subprocess
import sysconfig
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cl_runner.core.errors import DataError

log = logging.getLogger(__name__)

VERSION = "v1"  # bump when the output of a given seed changes; a new version builds into a new directory
DIR_NAME = f"cl-runner-offline-{VERSION}"
DEFAULT_DATA_DIR = "outputs/data"  # relative to the launch directory; $CL_DATA_DIR overrides (as in the configs)
LM_DOMAINS = ("definitions", "scripture", "jargon", "python")
WORDNET_DOMAINS = ("animal", "plant", "food", "artifact")
APT_PACKAGES = ("wordnet-base", "dict-gcide", "bible-kjv", "jargon-text")  # what .ci/run and the README install


@dataclass(frozen=True)
class Source:
    package: str  # the Debian package that installs it
    path: str


# Where each text lives once its package is installed. The jargon file sits in /usr/share/doc: images that drop
# documentation (a dpkg path-exclude for /usr/share/doc) lose it even with the package installed.
SOURCES: dict[str, Source] = {
    "definitions": Source("dict-gcide", "/usr/share/dictd/gcide.dict.dz"),
    "definitions-index": Source("dict-gcide", "/usr/share/dictd/gcide.index"),
    "scripture": Source("bible-kjv", "/usr/bin/bible"),  # the reader; it depends on bible-kjv-text (the data)
    "scripture-data": Source("bible-kjv-text", "/usr/lib/bible.data"),
    "jargon": Source("jargon-text", "/usr/share/doc/jargon-text/jargon.txt.gz"),
    "wordnet": Source("wordnet-base", "/usr/share/wordnet/data.noun"),
    "wordnet-index": Source("wordnet-base", "/usr/share/wordnet/index.noun"),
}
NEEDS = {  # sources each domain reads
    "definitions": ("definitions", "definitions-index"),
    "scripture": ("scripture", "scripture-data"),
    "jargon": ("jargon",),
    "python": (),
    "wordnet": ("wordnet", "wordnet-index"),
}
# WordNet 3.0 lexicographer files (lexnames): number -> noun.<name>
NOUN_LEXNAMES = {
    3: "Tops", 4: "act", 5: "animal", 6: "artifact", 7: "attribute", 8: "body", 9: "cognition", 10: "communication",
    11: "event", 12: "feeling", 13: "food", 14: "group", 15: "location", 16: "motive", 17: "object", 18: "person",
    19: "phenomenon", 20: "plant", 21: "possession", 22: "process", 23: "quantity", 24: "relation", 25: "shape",
    26: "state", 27: "substance", 28: "time",
}


@dataclass(frozen=True)
class Sizes:
    lm_train: int = 200  # documents per domain
    lm_validation: int = 25
    lm_test: int = 50
    max_chars: int = 600  # a document is cut at a word boundary after this many characters
    facts_per_domain: int = 48  # WordNet facts per lexicographer domain (train = validation = test)


# ------------------------------------------------------------------------------------------- availability
def missing_sources(domains: Iterable[str]) -> list[Source]:
    out: list[Source] = []
    for domain in domains:
        for name in NEEDS[domain]:
            source = SOURCES[name]
            if not Path(source.path).exists() and source not in out:
                out.append(source)
    return out


def check_sources(domains: Iterable[str]) -> None:
    """Raise one DataError naming every missing text and the Debian package that installs it."""
    missing = missing_sources(domains)
    if not missing:
        return
    packages = " ".join(dict.fromkeys(s.package for s in missing))
    listed = "; ".join(f"{s.path} (Debian package {s.package})" for s in missing)
    hint = ""
    if any(s.path.startswith("/usr/share/doc/") for s in missing):
        hint = ("; if jargon-text is installed and its file is still absent, this system drops /usr/share/doc "
                "(a path-exclude in /etc/dpkg/dpkg.cfg.d/): allow /usr/share/doc/jargon-text/* and reinstall it")
    raise DataError(f"offline data: texts not found: {listed}; install them with: "
                    f"apt-get install -y --no-install-recommends {packages}{hint}")


def package_versions(packages: Iterable[str]) -> dict[str, str | None]:
    """Installed Debian package versions (recorded in the manifest: other versions give other files)."""
    out: dict[str, str | None] = {}
    for package in packages:
        try:
            done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                                  timeout=30, check=False)
            out[package] = done.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            out[package] = None
    return out


# ------------------------------------------------------------------------------------------- text helpers
def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _cut(text: str, max_chars: int) -> str:
    """At most ``max_chars`` characters, cut at a word boundary (code: at a line boundary)."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    if "\n" in head:
        return head[: head.rfind("\n")].rstrip()
    return head[: head.rfind(" ")].rstrip() if " " in head else head


def _pick(count: int, items: list[Any], rng: random.Random, make: Callable[[Any], str | None]) -> list[str]:
    """``count`` documents from ``items`` in a seeded order; ``make`` returns None to skip an item."""
    order = list(range(len(items)))
    rng.shuffle(order)
    docs: list[str] = []
    seen: set[str] = set()
    for i in order:
        doc = make(items[i])
        if doc and doc not in seen:
            seen.add(doc)
            docs.append(doc)
            if len(docs) == count:
                return docs
    raise DataError(f"offline data: only {len(docs)} documents available, {count} requested; lower the sizes")


# ------------------------------------------------------------------------------------------- the four LM domains
_DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + _DICTD_DIGITS.index(char)
    return value


def _clean_gcide(raw: str) -> str:
    text = re.sub(r"\\[^\\\n]*\\", "", raw)  # pronunciations: \Ap"ple\
    lines = [line for line in text.splitlines() if not re.fullmatch(r"\s*\[[^\]]*\]\s*", line)]  # [1913 Webster]
    text = "\n".join(lines)
    text = re.sub(r"\[([A-Za-z]{1,2})[^\[\]\sA-Za-z]?\]|\[[^\[\]\sA-Za-z]([A-Za-z])\]", r"\1\2", text)  # [ae], [=e]
    for _ in range(2):
        text = re.sub(r"\[[^\[\]]*\]", "", text)  # etymologies and source notes
    text = text.replace("{", "").replace("}", "")
    text = re.sub(r"\(\s*[^()\s]*\s*\)", "", text, count=1)  # what is left of a pronunciation, e.g. (p"p'l)
    return re.sub(r"\s+([,.;:])", r"\1", _squash(text))


def gcide_documents(count: int, rng: random.Random, max_chars: int) -> list[str]:
    """Dictionary entries (headword, part of speech, numbered senses) from GCIDE's dictd files."""
    data = gzip.open(SOURCES["definitions"].path).read()
    spans: dict[int, int] = {}
    for line in Path(SOURCES["definitions-index"].path).read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and not parts[0].startswith("00-database"):
            spans.setdefault(_dictd_number(parts[1]), _dictd_number(parts[2]))
    entries = sorted(spans.items())

    def make(span: tuple[int, int]) -> str | None:
        start, length = span
        text = _clean_gcide(data[start : start + length].decode("utf-8", errors="replace"))
        # skip short entries (cross-references such as "See Rifle") and bare synonym lists
        return _cut(text, max_chars) if len(text) >= 120 and "Syn." not in text[:40] else None

    return _pick(count, entries, rng, make)


def kjv_documents(count: int, rng: random.Random, max_chars: int, verses_per_passage: int = 4) -> list[str]:
    """Passages of consecutive verses of the King James Bible, read with the ``bible`` program (bible-kjv)."""
    done = subprocess.run([SOURCES["scripture"].path, "-l10000", "Gen1:1-Rev22:21"], capture_output=True,
                          text=True, timeout=120, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise DataError(f"offline data: {SOURCES['scripture'].path} failed ({done.stderr.strip()[:200]}); "
                        "reinstall bible-kjv and bible-kjv-text")
    chapters: list[tuple[str, list[tuple[int, str]]]] = []
    for line in done.stdout.splitlines():
        verse = re.match(r"\s+(\d+) (.*)", line)
        if verse and chapters:
            chapters[-1][1].append((int(verse.group(1)), verse.group(2).strip()))
        elif line.strip() and not line[0].isspace():
            chapters.append((line.strip(), []))
    passages = []
    for heading, verses in chapters:
        for i in range(0, len(verses), verses_per_passage):
            group = verses[i : i + verses_per_passage]
            passages.append((heading, group))

    def make(passage: tuple[str, list[tuple[int, str]]]) -> str:
        heading, group = passage
        first, last = group[0][0], group[-1][0]
        verses = f"{first}-{last}" if last != first else f"{first}"
        return _cut(f"{heading}:{verses} " + " ".join(v for _, v in group), max_chars)

    return _pick(count, passages, rng, make)


def jargon_documents(count: int, rng: random.Random, max_chars: int) -> list[str]:
    """Glossary entries of the Jargon File (hacker slang), ``:term: ...`` followed by its definition."""
    lines = gzip.open(SOURCES["jargon"].path, "rt", encoding="utf-8", errors="replace").read().splitlines()
    entries: list[tuple[str, list[str]]] = []
    current: tuple[str, list[str]] | None = None
    for line in lines:
        head = re.match(r"   :([^:]+):", line)
        if head:
            current = (head.group(1), [])
            entries.append(current)
        elif current is not None and line.strip() and not line.startswith(" "):
            current = None  # a section heading ends the glossary entry
        elif current is not None:
            current[1].append(line)

    def make(entry: tuple[str, list[str]]) -> str | None:
        term, body = entry
        text = _squash(" ".join(body).replace("{", "").replace("}", ""))
        return _cut(f"{term}: {text}", max_chars) if len(text) >= 100 else None

    return _pick(count, entries, rng, make)


_STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages", "dist-packages",
                "__pycache__", "__phello__"}


def stdlib_directory() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_documents(count: int, rng: random.Random, max_chars: int, per_file: int = 2) -> list[str]:
    """Top-level functions and classes of the Python standard library's own source (this interpreter's)."""
    root = stdlib_directory()
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _STDLIB_SKIP)
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    files.sort()
    if not files:
        raise DataError(f"offline data: no Python source (.py) in {root}; install the interpreter's standard "
                        "library source (Debian: libpython3-stdlib)")
    docs: list[str] = []
    seen: set[str] = set()
    order = list(range(len(files)))
    rng.shuffle(order)
    for i in order:
        try:
            source = files[i].read_text(encoding="utf-8")
            with warnings.catch_warnings():  # old escape sequences in some modules' source
                warnings.simplefilter("ignore")
                tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        chunks = []
        for node in tree.body:  # top level: whole lines, decorators included
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                text = "\n".join(lines[first - 1 : node.end_lineno])
                if len(text) >= 150:
                    chunks.append(_cut(text, max_chars))
        for doc in rng.sample(chunks, min(per_file, len(chunks))):
            if doc not in seen:
                seen.add(doc)
                docs.append(doc)
        if len(docs) >= count:
            return docs[:count]
    raise DataError(f"offline data: only {len(docs)} code documents in {root}, {count} requested")


LM_READERS: dict[str, Callable[[int, random.Random, int], list[str]]] = {
    "definitions": gcide_documents,
    "scripture": kjv_documents,
    "jargon": jargon_documents,
    "python": python_documents,
}


# ------------------------------------------------------------------------------------------- WordNet facts
def _lemma(word: str) -> str:
    return re.sub(r"\(.*\)$", "", word).replace("_", " ")


def wordnet_facts(domains: tuple[str, ...], per_domain: int, rng: random.Random) -> dict[str, list[dict]]:
    """``per_domain`` facts per noun domain: word -> hypernym of the word's most frequent sense in that domain.

    Words with senses in more of the given domains come first (ties in seeded order), and a chosen word is used in
    every domain where it has a sense, so the tasks share subjects with domain-specific answers."""
    unknown = [d for d in domains if d not in NOUN_LEXNAMES.values()]
    if unknown:
        raise DataError(f"offline data: unknown WordNet noun domain(s) {', '.join(unknown)} "
                        f"(choose from {', '.join(NOUN_LEXNAMES.values())})")
    data = Path(SOURCES["wordnet"].path).read_bytes()  # a synset's offset is its line's byte offset

    def synset(offset: str) -> tuple[str, list[str], list[str], str]:
        start = int(offset)
        head, _, gloss = data[start : data.index(b"\n", start)].decode("utf-8").partition(" | ")
        f = head.split()
        n_words = int(f[3], 16)
        words = [f[4 + 2 * i] for i in range(n_words)]
        p = 4 + 2 * n_words
        pointers = [(f[p + 1 + 4 * i], f[p + 2 + 4 * i]) for i in range(int(f[p]))]
        hypernyms = [target for symbol, target in pointers if symbol in ("@", "@i")]
        return NOUN_LEXNAMES.get(int(f[1]), ""), words, hypernyms, gloss.strip()

    candidates: dict[str, dict[str, dict]] = {}
    single_word = re.compile(r"[a-z]{3,} ")  # one lower-case word: no phrases, names or abbreviations
    for line in open(SOURCES["wordnet-index"].path, encoding="utf-8"):
        if not single_word.match(line):
            continue  # (also skips the licence header)
        f = line.split()
        word, sense_count = f[0], int(f[2])
        for offset in f[-sense_count:]:  # senses, most frequent first
            if NOUN_LEXNAMES.get(int(data[int(offset) + 9 : int(offset) + 11])) not in domains:
                continue  # (the lexicographer file number sits at a fixed place in the line: cheap to test)
            domain, _, hypernyms, gloss = synset(offset)
            if domain in candidates.get(word, {}) or not hypernyms:
                continue
            hypernym = _lemma(synset(hypernyms[0])[1][0])
            definition = re.split(r';\s*"', gloss)[0].strip().rstrip(";").strip()
            if hypernym.lower() == word or len(hypernym.split()) > 3 or not 10 <= len(definition) <= 160:
                continue
            candidates.setdefault(word, {})[domain] = {"word": word, "domain": domain, "hypernym": hypernym,
                                                       "gloss": definition}
    words = sorted(candidates)
    rng.shuffle(words)
    words.sort(key=lambda w: -len(candidates[w]))  # stable: seeded order within each number of shared domains
    chosen: dict[str, list[dict]] = {d: [] for d in domains}
    for word in words:
        for domain, row in candidates[word].items():
            if len(chosen[domain]) < per_domain:
                chosen[domain].append(row)
        if all(len(rows) == per_domain for rows in chosen.values()):
            break
    short = [d for d, rows in chosen.items() if len(rows) < per_domain]
    if short:
        raise DataError(f"offline data: WordNet has fewer than {per_domain} usable nouns in {', '.join(short)}")
    return chosen


# ------------------------------------------------------------------------------------------- build
def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _build_into(target: Path, seed: int, sizes: Sizes) -> dict:
    for domain in LM_DOMAINS:
        rng = random.Random(f"offline-{VERSION}-{domain}-{seed}")
        n_train, n_val, n_test = sizes.lm_train, sizes.lm_validation, sizes.lm_test
        docs = LM_READERS[domain](n_train + n_val + n_test, rng, sizes.max_chars)
        # test first: the held-out documents stay the same when only the training size changes
        splits = {"test": docs[:n_test], "validation": docs[n_test : n_test + n_val], "train": docs[n_test + n_val :]}
        for split, rows in splits.items():
            _write_jsonl(target / "lm" / domain / f"{split}.jsonl", [{"text": d} for d in rows])
    facts = wordnet_facts(WORDNET_DOMAINS, sizes.facts_per_domain, random.Random(f"offline-{VERSION}-wordnet-{seed}"))
    for domain, rows in facts.items():
        _write_jsonl(target / "wordnet" / f"{domain}.jsonl", rows)
    files = sorted(p for p in target.rglob("*.jsonl"))
    manifest = {
        "version": VERSION, "seed": seed, "sizes": asdict(sizes),
        "sequences": {"lm": list(LM_DOMAINS), "wordnet": list(WORDNET_DOMAINS)},
        "debian_packages": package_versions(dict.fromkeys(s.package for s in SOURCES.values())),
        "python_stdlib": {"version": platform.python_version(), "path": str(stdlib_directory())},
        "files": {str(p.relative_to(target)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files},
    }
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def build(data_dir: Path | str, seed: int = 0, sizes: Sizes | None = None, force: bool = False) -> Path:
    """Build ``<data_dir>/cl-runner-offline-v1`` and return it. Written to a temporary sibling and renamed into
    place, so a reader never sees half a directory and concurrent builders do not clash."""
    root = Path(data_dir).expanduser() / DIR_NAME
    if root.exists() and not force:
        raise DataError(f"offline data: {root} already exists; pass --force to rebuild it")
    check_sources(("definitions", "scripture", "jargon", "python", "wordnet"))
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{DIR_NAME}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _build_into(tmp, seed, sizes or Sizes())
        if root.exists():  # --force: move the old one aside, then swap
            old = root.parent / f".{DIR_NAME}.old-{os.getpid()}"
            root.rename(old)
            tmp.rename(root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                tmp.rename(root)
            except OSError:
                if not root.exists():
                    raise  # not a lost race with another builder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# ------------------------------------------------------------------------------------------- used by the loader
def _paths(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [p for v in value.values() for p in _paths(v)]
    if isinstance(value, list | tuple):
        return [p for v in value for p in _paths(v)]
    return [str(value)]


def ensure_offline_data(data_files: Any, base_dir: Path, key: str) -> None:
    """Build the offline data (seed 0, default sizes) when a data file points into a missing offline directory."""
    for text in _paths(data_files):
        path = Path(text).expanduser()
        path = path if path.is_absolute() else base_dir / path
        root = next((p for p in path.parents if p.name == DIR_NAME), None)
        if root is None or path.exists():
            continue
        if root.exists():
            raise DataError(f"{key}: {path} is missing from the offline data in {root}; rebuild it with "
                            f"python scripts/build_offline_data.py --data-dir {root.parent} --force")
        log.info("building the offline task data in %s (once; scripts/build_offline_data.py does the same)", root)
        build(root.parent)
