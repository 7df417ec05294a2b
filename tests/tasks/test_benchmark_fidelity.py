"""The published benchmarks as published: for one example of each of the 15 tasks, the prompt the catalogue builds
from a row with the hub dataset's real columns equals O-LoRA's prompt byte for byte; O-LoRA's own released files
(CL_Benchmark) load through the same datasets code path with one setting and give the same prompts; sizes follow
the papers' rules. Fixtures only: nothing is downloaded.

Expected strings come from O-LoRA (github.com/cmnfriend/O-LoRA, commit 07117e1): its prompt is
"Task:<T>\\nDataset:<D>\\n" (src/uie_collator.py:58-67; every script passes --add_task_name True --add_dataset_name
True, e.g. scripts/order_1.sh:31-32) + the instruction (configs/instruction_config.json) + "Option: " + labels.json
joined by ", " + " \\n" + the row's "sentence" + "\\nAnswer:" (src/uie_dataset_lora.py:283, 310, 336, 362, 388, 439,
465; COPA: the row and "\\nAnswer:" only, line 413). Each SENTENCE below is copied from the CL_Benchmark file named.
"""

import dataclasses
import json
from pathlib import Path

import pytest
from helpers import REPO, make_config, write_jsonl

from cl_runner.core.errors import DataError
from cl_runner.scoring.answers import Reading
from cl_runner.tasks.load import load_task

# configs/instruction_config.json, lines 3, 6, 9, 12, 15, 18, 21
INSTRUCTION = {
    "NLI": 'What is the logical relationship between the "sentence 1" and the "sentence 2"? Choose one from the '
           "option.\n",
    "QQP": 'Whether the "first sentence" and the "second sentence" have the same meaning? Choose one from the '
           "option.\n",
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.\n",
    "TC": "What is the topic of the following paragraph? Choose one from the option.\n",
    "BoolQA": "According to the following passage, is the question true or false? Choose one from the option.\n",
    "MultiRC": "According to the following passage and question, is the candidate answer true or false? Choose one "
               "from the option.\n",
    "WiC": "Given a word and two sentences, whether the word is used with the same sense in both sentence? Choose one "
           "from the option.\n",
}
YAHOO_LABELS = ["Society & Culture", "Science & Mathematics", "Health", "Education & Reference", "Computers & Internet",
                "Sports", "Business & Finance", "Entertainment & Music", "Family & Relationships",
                "Politics & Government"]
DBPEDIA_LABELS = ["Company", "Educational Institution", "Artist", "Athlete", "Office Holder", "Mean of Transportation",
                  "Building", "Natural Place", "Village", "Animal", "Plant", "Album", "Film", "Written Work"]
STARS = ["very negative", "negative", "neutral", "positive", "very positive"]

# task -> (O-LoRA Task, Dataset, labels.json, CL_Benchmark row (sentence, label), the same example in hub columns)
CASES = {
    "dbpedia": ("TC", "dbpedia", DBPEDIA_LABELS,  # CL_Benchmark/TC/dbpedia/dev.json, row 808
                ("Title: Ten Empty\nText:  Ten Empty is a 2008 Australian film.\n", "Film"),
                {"title": "Ten Empty", "content": " Ten Empty is a 2008 Australian film.", "label": 12}),
    "agnews": ("TC", "agnews", ["World", "Sports", "Business", "Science or Technology"],  # TC/agnews/dev.json, row 106
               ("Title: Creative Sound Blaster Wireless Music\nText: &lt;strong&gt;Review&lt;/strong&gt; From PC to "
                "hi-fi via Wi-Fi\n", "Science or Technology"),
               {"title": "Creative Sound Blaster Wireless Music",
                "description": "&lt;strong&gt;Review&lt;/strong&gt; From PC to hi-fi via Wi-Fi", "label": 4}),
    # a copy of CL_Benchmark/TC/yahoo/test.json (row 2) in github.com/zzm-black/DEAL-Continuous-Low-Rank-Fine-Tuning
    "yahoo": ("TC", "yahoo", YAHOO_LABELS,
              ("Title: Help with homework for ten points!?\nQuestion: Who is the famous african american who won 13 "
               "grammys and recorded more than 2,000 songs on 70 albums which sold 40 million copies? I appreciate the "
               "help:)\nAnswer: Sounds like Quincy Jones, but it may be Ella Fitzgerald\n", "Education & Reference"),
              {"question_title": "Help with homework for ten points!?",
               "question_content": "Who is the famous african american who won 13 grammys and recorded more than "
                                   "2,000 songs on 70 albums which sold 40 million copies? I appreciate the help:)",
               "best_answer": "Sounds like Quincy Jones, but it may be Ella Fitzgerald", "topic": 3, "id": 0}),
    "amazon": ("SC", "amazon", STARS,  # CL_Benchmark/SC/amazon/dev.json, row 971
               ("Title: Sailboat Hull and Deck Repair\nText: Good book with understandable illustrations and practical "
                "suggestions.\n", "very negative"),
               {"text": "Good book with understandable illustrations and practical suggestions.", "label": 0,
                "id": "x", "label_text": "1"}),
    "yelp": ("SC", "yelp", STARS,  # CL_Benchmark/SC/yelp/train.json, row 3699
             ("Text: Director is rude. Setup is weird. Teachers don't care.\n", "very negative"),
             {"text": "Director is rude. Setup is weird. Teachers don't care.", "label": 0}),
    "imdb": ("SC", "IMDB", ["Good", "Bad"],  # CL_Benchmark/SC/IMDB/train.json, row 788
             ("Ming The Merciless does a little Bardwork and a movie most foul!", "Bad"),
             {"text": "Ming The Merciless does a little Bardwork and a movie most foul!", "label": 0}),
    "sst2": ("SC", "SST-2", ["Good", "Bad"],  # CL_Benchmark/SC/SST-2/dev.json, row 1
             ("Text: it 's not the ultimate depression-era gangster movie . ", "Bad"),
             {"sentence": "it 's not the ultimate depression-era gangster movie . ", "label": 0, "idx": 1}),
    "mnli": ("NLI", "MNLI", ["neutral", "entailment", "contradiction"],  # CL_Benchmark/NLI/MNLI/dev.json, row 993
             ("sentence 1: Emeralds? \nsentence 2: Are they wearing emeralds?", "neutral"),
             {"premise": "Emeralds? ", "hypothesis": "Are they wearing emeralds?", "label": 1, "idx": 0}),
    "cb": ("NLI", "CB", ["entailment", "contradiction", "neutral"],  # CL_Benchmark/NLI/CB/dev.json, row 14
           ("sentence 1: A: Your turn. B: Okay. Uh, I don't think they should abolish it.\nsentence 2: they should "
            "abolish it", "contradiction"),
           {"premise": "A: Your turn. B: Okay. Uh, I don't think they should abolish it.",
            "hypothesis": "they should abolish it", "label": 1, "idx": 0}),
    "rte": ("NLI", "RTE", ["contradiction", "entailment"],  # CL_Benchmark/NLI/RTE/dev.json, row 5
            ("sentence 1: The girl was found in Drummondville.\nsentence 2: Drummondville contains the girl.",
             "contradiction"),
            {"sentence1": "The girl was found in Drummondville.", "sentence2": "Drummondville contains the girl.",
             "label": 1, "idx": 5}),
    "qqp": ("QQP", "QQP", ["False", "True"],  # CL_Benchmark/QQP/QQP/dev.json, row 1388
            ("first sentence: What is a Euro?\nsecond sentence: What is euro?", "True"),
            {"question1": "What is a Euro?", "question2": "What is euro?", "label": 1, "idx": 0}),
    "boolq": ("BoolQA", "BoolQA", ["True", "False"],  # CL_Benchmark/BoolQA/BoolQA/dev.json, row 2644
              ("question: are they going to make a punisher season 2\npassage: The Punisher (season 2) -- The season "
               "is set for release in 2019.", "True"),
              {"question": "are they going to make a punisher season 2",
               "passage": "The Punisher (season 2) -- The season is set for release in 2019.", "label": 1, "idx": 0}),
    "multirc": ("MultiRC", "MultiRC", ["False", "True"],  # CL_Benchmark/MultiRC/MultiRC/train.json, row 1147
                ('paragraph: Mike and Jeff are close friends. The box is 10" by 10" by 10". \nquestion: Roughly how '
                 "many gumballs are missing?\ncandidate answer: No missing", "False"),
                {"paragraph": 'Mike and Jeff are close friends. The box is 10" by 10" by 10". ',
                 "question": "Roughly how many gumballs are missing?", "answer": "No missing", "label": 0,
                 "idx": {"paragraph": 0, "question": 0, "answer": 0}}),
    "wic": ("WiC", "WiC", ["True", "False"],  # CL_Benchmark/WiC/WiC/dev.json, row 48
            ("word: look\nA look of triumph.\nHis look was fixed on her eyes.", "False"),
            {"word": "look", "sentence1": "A look of triumph.", "sentence2": "His look was fixed on her eyes.",
             "start1": 2, "start2": 4, "end1": 6, "end2": 8, "idx": 0, "label": 0}),
    "copa": ("COPA", "COPA", ["A", "B"],  # CL_Benchmark/COPA/COPA/dev.json, row 32
             ('Which sentence is the cause of "I coughed."? Choose one between A and B.\nA: I inhaled smoke.\nB: I '
              "lowered my voice.", "A"),
             {"premise": "I coughed.", "choice1": "I inhaled smoke.", "choice2": "I lowered my voice.",
              "question": "cause", "label": 0, "idx": 32}),
}
# The row (multirc's paragraph shortened) is copied; what surrounds it is O-LoRA's code, cited in the docstring.
# amazon's hub copy has no review titles, so its hub prompt lacks the Title line (conf/tasks/catalogue/amazon.yaml).
HUB_DIFFERS = {"amazon": ("Title: Sailboat Hull and Deck Repair\n", "")}
LARGE = {"dbpedia", "agnews", "yahoo", "amazon", "yelp", "imdb", "mnli", "qqp"}  # O-LoRA tests 7,600 of each


def olora_prompt(task: str) -> str:
    kind, dataset, labels, (sentence, _), _ = CASES[task]
    head = f"Task:{kind}\nDataset:{dataset}\n"
    if kind != "COPA":
        head += INSTRUCTION[kind] + "Option: " + ", ".join(labels) + " \n"
    return head + sentence + "\nAnswer:"


@pytest.fixture(scope="module")
def catalogue():
    """The 15 task definitions, as composed (order 4 holds all 15; every sequence uses the same entries, which
    tests/config/test_task_configs.py checks)."""
    tasks = {task.name: task for task in make_config("tasks=long15_order4", small=False).tasks.tasks}
    assert set(tasks) == set(CASES)
    return tasks


def _hub_fixture(task, row: dict, root: Path):
    """The row in json files named like the hub's splits, read with the catalogue's prompt and columns."""
    splits = {task.train_split: [row, row], task.test_split: [row]}
    if task.validation_split:
        splits[task.validation_split] = [row]
    files = {split: str(write_jsonl(root / task.name / f"{split}.jsonl", rows)) for split, rows in splits.items()}
    return dataclasses.replace(task, path="json", subset=None, data_files=files, data_dir=None)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_hub_prompt_is_olora_prompt_byte_for_byte(name, catalogue, tmp_path):
    row, label = CASES[name][4], CASES[name][3][1]
    task = load_task(_hub_fixture(catalogue[name], row, tmp_path), seed=0, base_dir=tmp_path, key=f"tasks.{name}")
    expected = olora_prompt(name).replace(*HUB_DIFFERS.get(name, ("", "")))
    assert task.test[0].prompt == expected
    assert task.test[0].target == f" {label}"
    assert sorted(task.labels) == sorted(f" {w}" for w in CASES[name][2])  # the label words of labels.json


def _cl_benchmark(root: Path, rows_per_split: dict[str, int] | None = None, extra: dict | None = None) -> Path:
    """O-LoRA's released layout: CL_Benchmark/<Task>/<Dataset>/{train,dev,test}.json + labels.json."""
    for name, (kind, dataset, labels, (sentence, label), _) in CASES.items():
        folder = root / kind / dataset
        folder.mkdir(parents=True)
        (folder / "labels.json").write_text(json.dumps(labels))
        for split, n in (rows_per_split or {"train": 2, "dev": 1, "test": 1}).items():
            rows = [{"label": label, "sentence": sentence}] * n + (extra or {}).get((name, split), [])
            (folder / f"{split}.json").write_text(json.dumps(rows, indent=2))
    return root


def test_olora_released_files_load_with_one_setting_and_give_the_same_prompts(catalogue, tmp_path, monkeypatch):
    root = _cl_benchmark(tmp_path / "CL_Benchmark", extra={("mnli", "test"): [{"label": "-", "sentence": "s"}]})
    monkeypatch.setenv("CL_BENCHMARK_DIR", str(root))  # the one setting: every catalogue task reads its folder
    tasks = {t.name: t for t in make_config("tasks=long15_order4", small=False).tasks.tasks}
    for name, task_cfg in tasks.items():
        task = load_task(task_cfg, seed=0, base_dir=tmp_path, key=f"tasks.{name}")
        kind, dataset = CASES[name][:2]
        assert task.info["source"] == "cl_benchmark" and task.info["path"] == str(root / kind / dataset)
        assert task.test[0].prompt == olora_prompt(name), name  # exact for amazon and yahoo too
        assert task.labels == [f" {w}" for w in CASES[name][2]], name  # labels.json, in its order
        assert task.info["sizes"] == {"train": 2, "validation": 1, "test": 2 if name == "mnli" else 1}, name
    mnli = load_task(tasks["mnli"], seed=0, base_dir=tmp_path, key="tasks.mnli")
    assert [e.target for e in mnli.test] == [" neutral", " -"]  # O-LoRA's unanswerable MNLI rows are kept


def test_one_task_can_be_pointed_at_its_folder(catalogue, tmp_path):
    root = _cl_benchmark(tmp_path / "CL_Benchmark")
    cfg = dataclasses.replace(catalogue["boolq"], path=str(root / "BoolQA" / "BoolQA"))
    assert load_task(cfg, seed=0, base_dir=tmp_path, key="tasks.boolq").test[0].prompt == olora_prompt("boolq")


def test_a_wrong_folder_is_refused_with_the_key(catalogue, tmp_path):
    root = _cl_benchmark(tmp_path / "CL_Benchmark")
    wrong = dataclasses.replace(catalogue["boolq"], path=str(root / "TC" / "agnews"))
    with pytest.raises(DataError, match=r"^tasks\.boolq\.path: .*labels\.json lists World, Sports"):
        load_task(wrong, seed=0, base_dir=tmp_path, key="tasks.boolq")
    (root / "NLI" / "CB" / "labels.json").unlink()
    missing = dataclasses.replace(catalogue["cb"], data_dir=str(root))
    with pytest.raises(DataError, match=r"^tasks\.cb\.data_dir: .* has no NLI/CB/labels\.json"):
        load_task(missing, seed=0, base_dir=tmp_path, key="tasks.cb")
    typo = dataclasses.replace(catalogue["rte"], data_dir=str(tmp_path / "CL_Benchmrk"))  # never the hub instead
    with pytest.raises(DataError, match=r"^tasks\.rte\.data_dir: .*CL_Benchmrk is not a folder"):
        load_task(typo, seed=0, base_dir=tmp_path, key="tasks.rte")


def test_sizes_follow_the_papers_rules(catalogue):
    for name, task in catalogue.items():
        classes = len(task.verbalizer)
        assert (task.max_train_per_class, task.max_eval_per_class) == (None, None), name  # random, not per class
        train = None if name in {"cb", "copa"} else 1000 * classes  # CB, COPA: the whole training set
        assert task.max_train_examples == train, name
        assert task.max_eval_examples == (7600 if name in LARGE else None), name  # else the whole validation set
    for name in ("cb", "copa"):  # no training row held out for validation
        assert catalogue[name].validation_split == catalogue[name].test_split == "validation"


def test_sizes_computed_from_fixtures(catalogue, tmp_path):
    def loaded(name, rows):
        task = _hub_fixture(catalogue[name], CASES[name][4], tmp_path / name)
        for split, n in rows.items():
            write_jsonl(Path(task.data_files[split]), [CASES[name][4]] * n)
        return load_task(task, seed=0, base_dir=tmp_path, key=f"tasks.{name}").info["sizes"]

    assert loaded("cb", {"train": 250, "validation": 56}) == {"train": 250, "validation": 56, "test": 56}
    assert loaded("copa", {"train": 400, "validation": 100}) == {"train": 400, "validation": 100, "test": 100}
    agnews = loaded("agnews", {"train": 4500, "test": 7700})
    assert (agnews["train"], agnews["test"]) == (4000, 7600)
    assert loaded("wic", {"train": 2500, "validation": 638}) == {"train": 2000, "validation": 250, "test": 638}


def test_the_long_benchmark_files_say_what_olora_ran():
    experiment = REPO / "conf" / "experiment"
    order6 = (experiment / "olora_long15_order6.yaml").read_text()
    assert "scripts/long.sh" in order6 and "MNLI" in order6 and "2 epochs" in order6
    for order in (4, 5):
        text = (experiment / f"olora_long15_order{order}.yaml").read_text()
        assert "no script" in text and "O-LoRA #20" in text, order


OLORA_EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("olora_*.yaml"))


@pytest.mark.parametrize("experiment", OLORA_EXPERIMENTS)
def test_the_olora_experiments_score_answers_with_olora_normaliser(experiment):
    assert {task.normalizer for task in make_config(f"experiment={experiment}", small=False).tasks.tasks} == {"olora"}


def test_olora_exact_match_ignores_every_punctuation_mark_as_olora_does():
    # src/compute_metrics.py: exact_match_score compares normalize_answer(prediction) and normalize_answer(gold):
    # lower-cased, string.punctuation removed, whitespace collapsed
    olora, ours = Reading(normalizer="olora"), Reading()
    assert olora.normalized(" Science  Mathematics") == olora.normalized(" Science & Mathematics") \
        == "science mathematics"
    assert ours.normalized(" Science  Mathematics") != ours.normalized(" Science & Mathematics")
    assert olora.normalized(" Very-Positive") == "verypositive" != olora.normalized(" very positive")
