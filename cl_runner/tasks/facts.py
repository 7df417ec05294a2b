"""The bundled default tasks: fictional facts about invented subjects, generated deterministically from the seed.

Every relation uses the same subjects (the first ``num_subjects`` of one seeded list) with its own answers, and
the question names the relation. Learning the answers of a new relation rewrites the same subject
representations, so sequential fine-tuning forgets earlier relations while joint training keeps them all.
"""

from __future__ import annotations

import random

RELATIONS: dict[str, tuple[str, list[str]]] = {
    "color": ("What is the favourite colour of {s}?", ["red", "blue", "green", "yellow", "purple", "orange",
                                                         "white", "black"]),
    "city": ("Which city does {s} live in?", ["paris", "tokyo", "cairo", "lima", "oslo", "delhi", "rome", "quito"]),
    "food": ("What does {s} eat for breakfast?", ["rice", "bread", "cheese", "apples", "fish", "soup", "beans",
                                                   "honey"]),
    "animal": ("Which animal does {s} keep?", ["cats", "dogs", "horses", "owls", "goats", "bees", "frogs",
                                                 "foxes"]),
    "sport": ("Which sport does {s} play?", ["tennis", "chess", "rugby", "golf", "hockey", "boxing", "rowing",
                                               "judo"]),
    "instrument": ("Which instrument does {s} play?", ["piano", "violin", "drums", "flute", "harp", "cello",
                                                         "guitar", "oboe"]),
}

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]


def subjects(count: int, seed: int) -> list[str]:
    """``count`` distinct invented two-part names; the list for a larger count extends the smaller one."""
    rng = random.Random(f"subjects-{seed}")
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        parts = []
        for _ in range(2):
            word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.choice((2, 3))))
            parts.append(word.capitalize())
        name = " ".join(parts)
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def fact_rows(relation: str, num_subjects: int, seed: int) -> tuple[list[dict[str, str]], list[str]]:
    """Rows ``{"input": question, "target": answer}`` for one relation, and the relation's answer set."""
    question, answers = RELATIONS[relation]
    rng = random.Random(f"answers-{relation}-{seed}")
    rows = [{"input": question.format(s=s), "target": rng.choice(answers)} for s in subjects(num_subjects, seed)]
    return rows, list(answers)
