"""The 15 tasks of O-LoRA's long benchmark, one example each: O-LoRA's prompt for it (``olora_prompt``) and
O-LoRA's released files holding it (``cl_benchmark``), for tests/tasks/test_benchmark_fidelity.py and the
reproduction test. Fixtures only: nothing is downloaded.

Expected strings come from O-LoRA (github.com/cmnfriend/O-LoRA, commit 07117e1): its prompt is
"Task:<T>\\nDataset:<D>\\n" (src/uie_collator.py:58-67; every script passes --add_task_name True --add_dataset_name
True, e.g. scripts/order_1.sh:31-32) + the instruction (configs/instruction_config.json) + "Option: " + labels.json
joined by ", " + " \\n" + the row's "sentence" + "\\nAnswer:" (src/uie_dataset_lora.py:283, 310, 336, 362, 388, 439,
465; COPA: the row and "\\nAnswer:" only, line 413). Each SENTENCE below is copied from the CL_Benchmark file named.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def olora_prompt(task: str) -> str:
    kind, dataset, labels, (sentence, _), _ = CASES[task]
    head = f"Task:{kind}\nDataset:{dataset}\n"
    if kind != "COPA":
        head += INSTRUCTION[kind] + "Option: " + ", ".join(labels) + " \n"
    return head + sentence + "\nAnswer:"


def cl_benchmark(root: Path, rows_per_split: dict[str, int] | None = None, extra: dict | None = None) -> Path:
    """O-LoRA's released layout: CL_Benchmark/<Task>/<Dataset>/{train,dev,test}.json + labels.json."""
    for name, (kind, dataset, labels, (sentence, label), _) in CASES.items():
        folder = root / kind / dataset
        folder.mkdir(parents=True)
        (folder / "labels.json").write_text(json.dumps(labels))
        for split, n in (rows_per_split or {"train": 2, "dev": 1, "test": 1}).items():
            rows = [{"label": label, "sentence": sentence}] * n + (extra or {}).get((name, split), [])
            (folder / f"{split}.json").write_text(json.dumps(rows, indent=2))
    return root
