"""Synthetic controlled data: task families with a knob for the instruction/output length ratio (the IM paper's first
factor) and the number of examples (its second), plus a held-out split scored by exact match.

Families (FAMILIES):
- `rule`    long instruction, short output. A made-up code (ordinary words -> invented code words, fixed for a seed)
            described in varied sentences, with extra code entries, worked examples and remarks; output: the 1-3
            code words for the input.
- `recall`  `rule`'s code, but held-out questions ask only reserved words and their instructions leave out every
            entry and worked example of a reserved word, while every training instruction states all reserved
            entries. A held-out answer cannot be copied from its instruction: it must have been learnt from the
            training instructions, which IT never trains on and IM does (the paper's mechanism). The outputs are
            invented words, so memorising the training outputs moves probability away from held-out answers: the
            held-out output loss can pass a minimum and rise (the overfitting regime `imtune demo` shows).
- `lookup`  long instruction, short output. Notes about invented towns (mayor, founding year, river, ...; one world
            for a seed), phrased at random; a question whose 1-2 word answer is in the notes.
- `reverse` the contrast: short instruction ("Describe Tamor: its mayor and river."), long output (one fixed,
            checkable sentence per asked fact about the same world as `lookup`).

Each world is fixed by the seed alone. The held-out split asks what training never asks: `rule` held-out inputs use
code words reserved from training inputs (they still appear in training instructions, as entries and in worked
examples), `lookup` held-out questions ask reserved (town, fact) pairs (in training they appear only as other notes),
and `reverse` held-out requests are (town, facts) combinations no training example asks for. So with few examples,
IT sees only the few outputs, while IM also learns from the instructions that carry what the held-out split needs.

`ratio` targets the instruction/output ratio in words (the paper's convention, imtune.stats words mode: tags count
one word each) per example, by adding or leaving out instruction sentences (rule/lookup) or by the number of facts
asked for (reverse); each family has a floor (the shortest instruction that still states the task) and `reverse` a
ceiling. The ratio reached is approximate; `imtune data synth` prints it. Deterministic for a seed: the train split
does not depend on `heldout`, and Python's `random.Random` with string seeds is stable across runs and platforms.
"""
from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .types import Conversation, Message, UsageError, Where

# ----------------------------------------------------------------------------------------------------------------
# Invented words and the shared world of towns

CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"
# Real words the syllable pattern can make (no final -e is made, which rules out most: none, gale, bone, ...).
REAL = set((
    "data soda tuna lava sofa memo solo polo kilo menu tutu tuba gala diva nova pita lemon melon robin basin "
    "tiger paper sugar motor tutor radar rotor baton salon talon canon bison demon lemur tumor minor manor "
    "sonar lunar solar polar molar vapor valor favor rumor sitar liner diner later river fever never lover "
    "rider token dozen seven linen robot mama papa tofu sumo toga kimono banana potato tomato salami bikini "
    "safari zero"
).split())


def _pseudo(rng: random.Random, syllables: int) -> str:
    """An invented word: consonant-vowel syllables, the last vowel never `e`, then maybe n or r."""
    sy = [rng.choice(CONSONANTS) + rng.choice(VOWELS if i < syllables - 1 else "aiou") for i in range(syllables)]
    return "".join(sy) + rng.choice(["", "n", "r"])


def _unique(rng: random.Random, k: int, make: Callable[[], str], taken: set[str] | None = None) -> list[str]:
    """k distinct invented words, none real and none in `taken` (which it extends)."""
    taken = set() if taken is None else taken
    out: list[str] = []
    while len(out) < k:
        w = make()
        if w.lower() not in taken and w.lower() not in REAL:
            out.append(w)
            taken.add(w.lower())
    return out


WORDS = ["red", "blue", "green", "yellow", "black", "white", "cat", "dog", "horse", "bird", "fish", "river", "stone",
         "tree", "house", "bread", "milk", "apple", "moon", "sun", "rain", "wind", "book", "door", "lamp", "ship"]
GOODS = ["amber", "salt", "wool", "copper", "glass", "honey", "timber", "figs", "tea", "silk", "cheese", "pottery"]
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "purple", "orange"]

# attribute -> (short noun for `reverse` requests, note templates, question templates, the fixed `reverse` sentence)
ATTRS: dict[str, tuple[str, list[str], list[str], str]] = {
    "mayor": ("mayor", ["The mayor of {t} is {v}.", "{v} serves as the mayor of {t}.", "In {t}, the mayor is {v}.",
                        "{t} has {v} as its mayor."],
              ["Who is the mayor of {t}?", "Name the mayor of {t}.", "What is the name of the mayor of {t}?"],
              "The mayor of {t} is {v}, who was chosen by the town council and meets people every market day."),
    "founded": ("founding", ["{t} was founded in {v}.", "The town of {t} dates from {v}.",
                                  "Records say {t} was built in {v}."],
                ["In which year was {t} founded?", "When was {t} founded?", "What year does {t} date from?"],
                "{t} was founded in the year {v}, and the date is still carved above the old town gate."),
    "river": ("river", ["{t} lies on the river {v}.", "The river {v} runs through {t}.",
                        "{t} is built beside the {v}."],
              ["Which river runs through {t}?", "On which river does {t} lie?", "Name the river of {t}."],
              "The river {v} flows through {t}, and small boats carry people and goods along its banks."),
    "export": ("export", ["The main export of {t} is {v}.", "{t} is known for selling {v}.",
                               "Most traders visit {t} to buy {v}."],
               ["What is the main export of {t}?", "What does {t} mainly sell?", "What do traders buy in {t}?"],
               "The main export of {t} is {v}, which merchants take to the other towns every autumn."),
    "festival": ("festival", ["Every summer {t} holds the {v} festival.", "The festival of {t} is called {v}.",
                              "People in {t} celebrate the {v} festival."],
                 ["What is the festival of {t} called?", "Which festival does {t} hold?",
                  "Name the festival celebrated in {t}."],
                 "The people of {t} hold the {v} festival each summer, with music and food in the streets."),
    "neighbour": ("neighbour", ["The nearest town to {t} is {v}.", "{t} is a neighbour of {v}.",
                                        "From {t} it is a short walk to {v}."],
                  ["Which town is nearest to {t}?", "Name the neighbouring town of {t}.",
                   "What is the closest town to {t}?"],
                  "The nearest town to {t} is {v}, and a stone road connects the two towns."),
    "flag": ("flag", ["The flag of {t} is {v}.", "{t} flies a {v} flag.", "The colour of the flag of {t} is {v}."],
             ["What colour is the flag of {t}?", "Which colour is the flag of {t}?", "Name the colour of {t}'s flag."],
             "The flag of {t} is {v}, and it hangs from the tower of the town hall."),
    "population": ("population", ["{t} has {v} inhabitants.", "About {v} people live in {t}.",
                                  "The population of {t} is {v}."],
                   ["How many people live in {t}?", "What is the population of {t}?",
                    "How many inhabitants does {t} have?"],
                   "The town of {t} has {v} inhabitants, most of whom live close to the central square."),
}


def towns_world(rng: random.Random, n_towns: int = 16) -> dict:
    """Invented towns and their facts: {"towns": [...], "facts": {(town, attr): value}}."""
    taken: set[str] = set()  # every invented name is used once, so no answer can be read two ways
    towns = _unique(rng, n_towns, lambda: _pseudo(rng, 2).capitalize(), taken)
    names = _unique(rng, 2 * n_towns, lambda: _pseudo(rng, 2).capitalize(), taken)
    rivers = _unique(rng, n_towns, lambda: _pseudo(rng, 2).capitalize(), taken)
    fests = _unique(rng, n_towns, lambda: _pseudo(rng, 3).capitalize(), taken)
    facts = {}
    for i, t in enumerate(towns):
        facts[t, "mayor"] = f"{names[2 * i]} {names[2 * i + 1]}"
        facts[t, "founded"] = str(rng.randint(1100, 1900))
        facts[t, "river"] = rivers[i]
        facts[t, "export"] = rng.choice(GOODS)
        facts[t, "festival"] = fests[i]
        facts[t, "neighbour"] = rng.choice([x for x in towns if x != t])
        facts[t, "flag"] = rng.choice(COLOURS)
        facts[t, "population"] = str(rng.randint(8, 950) * 10)
    return {"towns": towns, "facts": facts}


def code_world(rng: random.Random, n_words: int = 16, n_reserved: int = 4) -> dict:
    words = rng.sample(WORDS, n_words)
    taken = set(WORDS)
    codes = _unique(rng, n_words, lambda: _pseudo(rng, 2), taken)
    name = _unique(rng, 1, lambda: _pseudo(rng, 2).capitalize(), taken)[0]
    return {"name": name, "code": dict(zip(words, codes)), "reserved": words[:n_reserved]}


def _n_words(text: str) -> int:
    return len(text.split())


def _fill(base: int, target: float, candidates, text=lambda s: s) -> list:
    """Take candidates (sentences, or items whose `text(item)` is one) while each brings the word count of an
    instruction that already has `base` words closer to `target`. Lazy: stops reading at the first that would not."""
    taken, n = [], base
    for s in candidates:
        k = _n_words(text(s))
        if n + k / 2 > target:
            break
        taken.append(s)
        n += k
    return taken


def _content_target(ratio: float, answer: str) -> float:
    """Instruction content words for instruction/output = ratio in the paper's convention (each tag is one word)."""
    return ratio * (_n_words(answer) + 1) - 1


# ----------------------------------------------------------------------------------------------------------------
# Families: make(rng, world, ratio, split) -> (instruction, answer, key)

RULE_INTROS = ["You will translate words into the {c} code, a secret language made up by a club of puzzle makers.",
               "The {c} code replaces ordinary English words with invented code words.",
               "Here is a small invented language called the {c} code.",
               "Members of the {c} club write their messages in a private code."]
RULE_PROCEDURES = ["Replace every word of the input with its code word and keep the words in the same order.",
                   "Write the code word for each input word, in order, separated by single spaces.",
                   "To encode a message, swap each word for its code word without changing the order.",
                   "Encoding is done word by word: each word becomes its code word, and the order stays the same."]
RULE_ENTRIES = ["'{w}' is written as '{c}'.", "The code word for {w} is {c}.", "Whenever you see {w}, write {c}.",
                "In this code, {w} becomes {c}.", "{w} is encoded as {c}."]
RULE_EXAMPLES = ["For example, '{x}' becomes '{y}'.", "Example: {x} -> {y}", "So '{x}' is encoded as '{y}'.",
                 "Another example: the input '{x}' gives '{y}'."]
RULE_REMARKS = ["Code words are always written in lower case.", "Do not explain your answer.",
                "Answer with the code words only.", "The code words mean nothing in any real language.",
                "Every word has exactly one code word.", "Punctuation is never part of an encoded message.",
                "The club changes its code every year, so learn this version carefully.",
                "Nobody outside the club is supposed to read these messages."]
RULE_QUESTIONS = ["Now encode: {x}", "Input: {x}", "Translate this into the code: {x}", "Encode the words '{x}'.",
                  "What is '{x}' in the code?"]


def make_rule(rng: random.Random, world: dict, ratio: float, split: str, recall: bool = False):
    """`rule`, or with `recall` the `recall` family: held-out inputs are reserved words only and their instructions
    carry no entry or worked example for any reserved word, while every training instruction carries the entries of
    all reserved words (so only what was learnt from training instructions can answer a held-out question)."""
    code, reserved = world["code"], world["reserved"]
    allowed = [w for w in code if w not in reserved]
    k = rng.randint(1, 3)
    if split == "train":
        words = rng.sample(allowed, k)
    elif recall:  # reserved words only; their entries are left out below
        words = rng.sample(reserved, min(k, len(reserved)))
    else:  # at least one reserved word, the rest from anywhere
        words = [rng.choice(reserved)] + rng.sample([w for w in code if w not in reserved], k - 1)
        rng.shuffle(words)
    answer = " ".join(code[w] for w in words)
    c = world["name"]
    head = [rng.choice(RULE_INTROS).format(c=c), rng.choice(RULE_PROCEDURES)]
    hidden = set(reserved) if recall and split != "train" else set()  # never stated in this instruction
    given = [w for w in words if w not in hidden]
    if recall and split == "train":  # the knowledge held-out questions need, in every training instruction
        given += [w for w in reserved if w not in given]
    entries = [rng.choice(RULE_ENTRIES).format(w=w, c=code[w]) for w in given]
    question = rng.choice(RULE_QUESTIONS).format(x=" ".join(words))
    others = [w for w in code if w not in words and w not in hidden and w not in given]
    rng.shuffle(others)
    remarks = rng.sample(RULE_REMARKS, len(RULE_REMARKS))

    def candidates():  # extra entries, remarks and (without end) worked examples, in random order
        while True:
            kind = rng.choice(["entry"] * bool(others) + ["remark"] * bool(remarks) + ["example"])
            if kind == "entry":
                w = others.pop()
                yield "entry", rng.choice(RULE_ENTRIES).format(w=w, c=code[w])
            elif kind == "remark":
                yield "remark", remarks.pop()
            else:
                xs = rng.sample([w for w in code if w not in hidden], rng.randint(1, 3))
                if xs == words:  # a worked example never gives the answer away
                    continue
                yield "example", rng.choice(RULE_EXAMPLES).format(x=" ".join(xs), y=" ".join(code[x] for x in xs))

    base = sum(map(_n_words, head + entries)) + _n_words(question)
    extra = _fill(base, _content_target(ratio, answer), candidates(), text=lambda item: item[1])
    entries += [s for kind, s in extra if kind == "entry"]
    rng.shuffle(entries)
    body = entries + [s for kind, s in extra if kind == "remark"]
    examples = [s for kind, s in extra if kind == "example"]
    text = "\n\n".join(filter(None, [" ".join(head), " ".join(body), "\n".join(examples)]))
    return text + "\n\n" + question, answer, tuple(words)


LOOKUP_INTROS = ["Read the notes below and answer the question with only the answer.",
                 "Below are some facts about small towns. Use them to answer the question at the end.",
                 "The following notes come from an old travel guide. Answer the question using them.",
                 "Here is what a traveller wrote down about a few towns. Reply with just the answer."]
LOOKUP_REMARKS = ["Some notes are about other towns; ignore them.", "Give the answer in as few words as possible.",
                  "The notes are in no particular order.", "All the towns are in the same valley.",
                  "Do not repeat the question in your answer.", "The traveller checked every note twice."]


def make_lookup(rng: random.Random, world: dict, ratio: float, split: str):
    facts = world["facts"]
    reserved = world["reserved"]
    keys = sorted(reserved) if split == "heldout" else [k for k in facts if k not in reserved]
    t, a = rng.choice(keys)
    answer = facts[t, a]
    note = lambda key: rng.choice(ATTRS[key[1]][1]).format(t=key[0], v=facts[key])  # noqa: E731
    question = rng.choice(ATTRS[a][2]).format(t=t)
    intro = rng.choice(LOOKUP_INTROS)
    others = [k for k in facts if k != (t, a)]
    rng.shuffle(others)
    # Notes about the same town or the same fact of other towns first: they make the question need reading.
    others.sort(key=lambda k: not (k[0] == t or k[1] == a) or rng.random() < 0.3)
    remarks = rng.sample(LOOKUP_REMARKS, len(LOOKUP_REMARKS))
    cands = [note(k) for k in others]
    for r in remarks[:3]:
        cands.insert(rng.randint(0, len(cands)), r)
    base = _n_words(intro) + _n_words(note((t, a))) + _n_words(question)
    extra = _fill(base, _content_target(ratio, answer), cands)
    notes = [s for s in extra if s not in LOOKUP_REMARKS] + [note((t, a))]
    rng.shuffle(notes)
    tail = [s for s in extra if s in LOOKUP_REMARKS]
    text = intro + "\n\n" + "\n".join(notes) + "\n\n" + " ".join(tail + [f"Question: {question}"])
    return text, answer, (t, a)


REVERSE_ASKS = ["Describe {t}: its {a}.", "Tell me about the {a} of {t}.",
                "Write a short profile of {t} covering its {a}.",
                "What do you know about the {a} of {t}?"]
REVERSE_REMARKS = ["Answer in full sentences.", "Keep the order in which I listed the topics.",
                   "Do not add facts that I did not ask for.", "I am writing a short guide for travellers.",
                   "One sentence per topic is enough.", "Please be precise.", "Use plain language."]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def make_reverse(rng: random.Random, world: dict, ratio: float, split: str):
    facts = world["facts"]
    t = rng.choice(world["towns"])
    order = rng.sample(list(ATTRS), len(ATTRS))
    ask = rng.choice(REVERSE_ASKS)
    remarks = rng.sample(REVERSE_REMARKS, len(REVERSE_REMARKS))

    def build(k: int):
        attrs = order[:k]
        answer = " ".join(ATTRS[a][3].format(t=t, v=facts[t, a]) for a in attrs)
        text = ask.format(t=t, a=_join([ATTRS[a][0] for a in attrs]))
        extra = _fill(_n_words(text), _content_target(ratio, answer), remarks)
        return " ".join([text, *extra]), answer, (t, tuple(attrs))

    def off(k: int) -> float:  # distance from the target ratio, on a log scale
        text, answer, _ = build(k)
        return abs((_n_words(text) + 1) / (_n_words(answer) + 1) / ratio - 1)

    return build(min(range(1, len(ATTRS) + 1), key=off))


@dataclass(frozen=True)
class Family:
    make: Callable  # (rng, world, ratio, split) -> (instruction, answer, key)
    world: Callable  # (rng) -> world, fixed for a seed
    default_ratio: float  # instruction/output in words (paper convention)
    about: str


def _lookup_world(rng: random.Random) -> dict:
    w = towns_world(rng)
    keys = sorted(w["facts"])
    w["reserved"] = set(rng.sample(keys, len(keys) // 5))  # held-out questions; in training only as other notes
    return w


FAMILIES: dict[str, Family] = {
    "rule": Family(make_rule, code_world, 25.0,
                   "a made-up code described at length (+ worked examples); output: 1-3 code words"),
    "lookup": Family(make_lookup, _lookup_world, 30.0,
                     "notes about invented towns; output: the 1-2 word answer to a question about them"),
    "reverse": Family(make_reverse, towns_world, 0.12,
                      "contrast: a short request about a town; output: one long fixed sentence per asked fact"),
    "recall": Family(functools.partial(make_rule, recall=True), functools.partial(code_world, n_reserved=4), 25.0,
                     "the made-up code of `rule`; held-out questions ask words whose entries only training "
                     "instructions carry; output: 1-3 code words"),
}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise UsageError(f"unknown synthetic family {name!r}; valid: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def synthesize(family_name: str, n: int, ratio: float | None = None, seed: int = 0,
               heldout: int = 0) -> tuple[list[Conversation], list[Conversation]]:
    """(train, heldout) conversations of one family: n and `heldout` distinct examples, deterministic for a seed."""
    fam = family(family_name)
    if n < 1 or heldout < 0:
        raise UsageError("n must be >= 1 and heldout >= 0")
    ratio = fam.default_ratio if ratio is None else float(ratio)
    if not ratio > 0:
        raise UsageError("ratio must be > 0")
    world = fam.world(random.Random(f"world:{family_name}:{seed}"))
    out: dict[str, list[Conversation]] = {"train": [], "heldout": []}
    seen: set[tuple[str, str]] = set()
    train_keys: set = set()
    for split, count in (("train", n), ("heldout", heldout)):
        rng = random.Random(f"{family_name}:{seed}:{split}")
        tries = 0
        while len(out[split]) < count:
            tries += 1
            if tries > 50 * count + 1000:
                raise UsageError(f"family {family_name} cannot make {count} distinct {split} examples for seed {seed}"
                                 f" (made {len(out[split])}); ask for fewer")
            text, answer, key = fam.make(rng, world, ratio, split)
            if (text, answer) in seen or (split == "heldout" and key in train_keys):
                continue
            seen.add((text, answer))
            if split == "train":
                train_keys.add(key)
            i = len(out[split])
            out[split].append(Conversation((Message("user", text), Message("assistant", answer)),
                                           Where(f"<synth:{family_name}:{seed}:{split}>", i + 1, i)))
    return out["train"], out["heldout"]


def normalize(text: str) -> str:
    """What exact match compares: whitespace collapsed and stripped, case-folded, trailing periods removed."""
    return " ".join(text.split()).casefold().rstrip(".").rstrip()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def exact_match_rate(predictions: list[str], heldout: list[Conversation]) -> float:
    """Share of predictions that exactly match the last assistant message of each held-out conversation."""
    if len(predictions) != len(heldout):
        raise ValueError(f"{len(predictions)} predictions for {len(heldout)} held-out examples")
    refs = [c.messages[-1].content for c in heldout]
    return sum(map(exact_match, predictions, refs)) / max(len(refs), 1)


def write_jsonl(path: str | Path, conversations: list[Conversation], family_name: str, seed: int, split: str) -> Path:
    """The `messages` format, one record a line, with `id` and `family` beside `messages`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, c in enumerate(conversations):
            rec = {"id": f"{family_name}-{seed}-{split}-{i}", "family": family_name,
                   "messages": [{"role": m.role, "content": m.content} for m in c.messages]}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path
