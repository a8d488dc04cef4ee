"""Generate the demo's task suites (qa, math, code, text) from the knowledge base, deterministically.

Every item comes from a fact (a capital, a sum, a function to write) and a phrasing template. The
held-out test split holds, for each fact, one phrasing never used for that fact in training: the
test asks what the model has learned in words it has not seen it asked in. (Unseen facts, such as
sums never shown, are beyond a few-million-parameter model trained for an hour on a CPU.)

    python -m dllm_studio.demo.tasks --out resources/tasks
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

from dllm_studio.demo import knowledge as kb

QA_TEMPLATES = {
    "capital": ["What is the capital of {x}?", "Which city is the capital of {x}?", "Name the capital city of {x}.",
                "What city is the capital of {x}?", "Tell me the capital of {x}.", "The capital of {x} is which city?"],
    "animal": ["What class of animal is a {x}?", "Which animal class does the {x} belong to?",
               "A {x} is what kind of animal?", "To which class of animals does the {x} belong?",
               "Is a {x} a mammal, bird, fish, reptile, amphibian or insect?", "What kind of animal is the {x}?"],
    "opposite": ["What is the opposite of {x}?", "Give the opposite of the word {x}.",
                 "Which word means the opposite of {x}?", "What word is the antonym of {x}?",
                 "Name the opposite of {x}.", "The opposite of {x} is what?"],
    "colour": ["What colour is {x}?", "What is the colour of {x}?", "Which colour is {x}?",
               "Tell me the colour of {x}.", "Name the colour of {x}.", "{X} is usually what colour?"],
}
TEXT_TEMPLATES = {
    "capital": ["The capital of {x} is {y}.", "{y} is the capital of {x}.", "{x} has {y} as its capital city.",
                "The city of {y} is the capital of {x}."],
    "animal": ["A {x} is a {y}.", "The {x} is a kind of {y}.", "Every {x} is a {y}.", "Biologists class the {x} as a {y}."],
    "opposite": ["The opposite of {x} is {y}.", "{X} is the opposite of {y}.", "{X} and {y} are opposites.",
                 "The word {y} means the opposite of {x}."],
    "colour": ["{X} is {y}.", "The colour of {x} is {y}.", "{X} is usually {y}.", "Most people would say {x} is {y}."],
}
MATH_TEMPLATES = {
    "+": ["What is {a} plus {b}?", "Tom has {a} apples and buys {b} more. How many apples does he have now?",
          "Add {a} and {b}.", "A box holds {a} red balls and {b} blue balls. How many balls are in the box?",
          "Compute {a} + {b}.", "Sara read {a} pages on Monday and {b} pages on Tuesday. How many pages did she read?"],
    "-": ["What is {a} minus {b}?", "Tom has {a} apples and gives away {b}. How many apples are left?",
          "Subtract {b} from {a}.", "There were {a} birds on a tree and {b} flew away. How many birds are left?",
          "Compute {a} - {b}.", "A shop had {a} cakes and sold {b}. How many cakes remain?"],
    "*": ["What is {a} times {b}?", "There are {a} bags with {b} marbles in each. How many marbles are there?",
          "Multiply {a} by {b}.", "A shelf has {a} rows of {b} books. How many books are on the shelf?",
          "Compute {a} * {b}.", "Each of {a} children has {b} pencils. How many pencils do they have?"],
    "++": ["What is {a} plus {b} plus {c}?", "Add {a}, {b} and {c}.", "Compute {a} + {b} + {c}.",
           "Ann has {a} coins, Ben has {b} and Cy has {c}. How many coins do they have together?",
           "A farm has {a} cows, {b} pigs and {c} goats. How many animals is that?"],
}
CODE_TEMPLATES = [
    "Write a Python function {name}({args}) that returns {desc}.",
    "Define {name}({args}) in Python so that it returns {desc}.",
    "Implement the Python function {name}({args}). It should return {desc}.",
    "Python: write {name}({args}) returning {desc}.",
    "Create a function {name}({args}) which returns {desc}.",
]
MATH_TEST_ITEMS = 150  # a deterministic sample of the held-out math items keeps `eval` fast


def stable_hash(text: str) -> int:
    """A hash that is the same on every run and machine (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def held_out(fact: str, n_templates: int) -> int:
    """The template index reserved for the test split for this fact."""
    return stable_hash(fact) % n_templates


def _fill(template: str, **values) -> str:
    x = values.get("x", "")
    return template.format(X=x[:1].upper() + x[1:], **values)


def _split(suite: str, fact: str, templates: list[str], make) -> tuple[list[dict], list[dict]]:
    """One item per template; the held-out template's item goes to test, the rest to train."""
    test_index = held_out(fact, len(templates))
    train, test = [], []
    for i, template in enumerate(templates):
        item = {"suite": suite, **make(template), "fact": fact, "template": i}
        (test if i == test_index else train).append(item)
    return train, test


def relation_facts() -> list[tuple[str, str, str]]:
    """(relation, subject, answer) for every QA / text fact."""
    facts = [("capital", c, cap) for c, cap in kb.CAPITALS.items()]
    facts += [("animal", a, cls) for a, cls in kb.ANIMAL_CLASSES.items()]
    facts += [("opposite", w, o) for w, o in kb.OPPOSITES.items()]
    facts += [("colour", t, c) for t, c in kb.COLOURS.items()]
    return facts


def qa_items() -> tuple[list[dict], list[dict]]:
    train, test = [], []
    for relation, x, y in relation_facts():
        a, b = _split("qa", f"{relation}:{x}", QA_TEMPLATES[relation],
                      lambda t: {"prompt": _fill(t, x=x), "answer": y})
        train += a
        test += b
    return train, test


def text_items() -> tuple[list[dict], list[dict]]:
    train, test = [], []
    for relation, x, y in relation_facts():
        a, b = _split("text", f"{relation}:{x}", TEXT_TEMPLATES[relation], lambda t: {"text": _fill(t, x=x, y=y)})
        train += a
        test += b
    return train, test


def math_facts() -> list[tuple[str, tuple[int, ...], int]]:
    facts = [("+", (a, b), a + b) for a in range(13) for b in range(13)]
    facts += [("-", (a, b), a - b) for a in range(16) for b in range(a + 1)]
    facts += [("*", (a, b), a * b) for a in range(10) for b in range(10)]
    facts += [("++", (a, b, c), a + b + c) for a in range(1, 6) for b in range(1, 6) for c in range(1, 6)]
    return facts


def math_solution(op: str, args: tuple[int, ...], result: int) -> str:
    """The worked answer, "4 + 10 = 14": the model restates the sum before its result, so every phrasing of
    a fact ends in one shared equation (the scorer reads the final number, so the working costs nothing)."""
    return f" {op[0]} ".join(map(str, args)) + f" = {result}"  # "++" (three terms) is written with "+"


def math_op(item: dict) -> str:
    """A math item's operation ("+", "-", "*", "++"): the head of its fact key, "op:(args)"."""
    return item["fact"].split(":", 1)[0]


def qa_phrasing(item: dict) -> str:
    """A qa item's phrasing: "subject-first" when its question word comes after the subject ("The capital of
    Spain is which city?"), else "question-first"."""
    text = QA_TEMPLATES[item["fact"].split(":", 1)[0]][item["template"]].lower()
    asks = [text.index(word) for word in ("what", "which") if word in text]
    return "subject-first" if asks and text.index("{x}") < min(asks) else "question-first"


def kind(item: dict) -> str:
    """What an item asks, within its suite: a math item's operation, a qa item's phrasing, else its suite."""
    return {"math": math_op, "qa": qa_phrasing}.get(item["suite"], lambda x: x["suite"])(item)


def math_items() -> tuple[list[dict], list[dict]]:
    train, test = [], []
    for op, args, result in math_facts():
        values = dict(zip("abc", args))
        a, b = _split("math", f"{op}:{args}", MATH_TEMPLATES[op],
                      lambda t: {"prompt": t.format(**values), "answer": str(result),
                                 "solution": math_solution(op, args, result)})
        train += a
        test += b
    test.sort(key=lambda item: stable_hash(item["prompt"]))
    return train, test[:MATH_TEST_ITEMS]


def code_answer(name: str, args: str, body: str) -> str:
    return f"def {name}({args}):\n    return {body.removeprefix('return ')}"


def code_items() -> tuple[list[dict], list[dict]]:
    train, test = [], []
    for name, args, desc, body, cases in kb.CODE_TASKS:
        tests = [f"assert {name}({call}) == {expected}" for call, expected in cases]
        a, b = _split("code", f"code:{name}", CODE_TEMPLATES, lambda t: {
            "prompt": t.format(name=name, args=args, desc=desc), "answer": code_answer(name, args, body),
            "entry_point": name, "tests": tests})
        train += a
        test += b
    return train, test


GENERATORS = {"qa": qa_items, "math": math_items, "code": code_items, "text": text_items}


def write_suites(out: Path) -> dict[str, tuple[int, int]]:
    """Write {suite}.{train,test}.jsonl into `out`; returns item counts per suite."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for suite, generate in GENERATORS.items():
        splits = dict(zip(("train", "test"), generate()))
        for split, items in splits.items():
            for i, item in enumerate(items):
                item["id"] = f"{suite}-{split}-{i:04d}"
            _write_jsonl(out / f"{suite}.{split}.jsonl", items)
        counts[suite] = (len(splits["train"]), len(splits["test"]))
    return counts


def _write_jsonl(path: Path, items: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps({"id": item.pop("id"), **item}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate the demo task suites.")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "resources" / "tasks")
    args = parser.parse_args()
    for suite, (n_train, n_test) in write_suites(args.out).items():
        print(f"{suite:5s} train {n_train:5d}  test {n_test:4d}")


if __name__ == "__main__":
    main()
