"""Synthetic controlled data: task families with a knob for the instruction/output length ratio (the IM paper's first
factor) and the number of examples (its second), plus a held-out split scored by exact match.

The fair families (`rule`, `lookup`, `reverse`) make every example independent: each has a fresh world of its own (a
code table, towns and their facts), everything its answer needs is stated in its own instruction, and every invented
word (code words, names, towns, rivers, festivals) is drawn once for the whole data set, training split first. So no
name, fact or answer string of a held-out example occurs in any training record, and IM cannot win by having trained
on the held-out answers: the held-out split asks the same kind of question about worlds neither arm has seen.

- `rule`    long instruction, short output. A made-up code for this example (ordinary words -> invented code words)
            described in varied sentences, with extra code entries, worked examples and remarks; output: the 1-3
            code words for the input. Ratio ~10 and up (the floor is the task statement with its entries).
- `lookup`  long instruction, short output. Notes about this example's invented towns (mayor, founding year, river,
            ...), phrased at random; a question whose answer (a 1-2 word invented name) is in the notes. Ratio ~5 and
            up.
- `reverse` the contrast and the span: a request to describe one town's asked facts, the facts as terse notes
            (with notes about other towns as the ratio asks), and an output of one fixed, checkable two-sentence
            passage per asked fact. From ~0.14 (all eight facts asked, no other notes) to ~5 (one fact, many notes),
            so `imtune study --factor ratio --family reverse` crosses the paper's thresholds (0.15, 0.5).
- `recall`  AN ILLUSTRATION, NOT EVIDENCE: "IM learns what instructions state". One code shared by the whole data set;
            held-out questions ask words whose entries only the *training instructions* state. IM trains on those
            tokens and IT never does, so IM wins by construction. Kept to show the mechanism; never used for the demo,
            for stats.EVIDENCE or for the README's evidence.

`ratio` targets the instruction/output ratio in words (the paper's convention, imtune.analysis.stats words mode: tags
count one word each) per example, by adding or leaving out instruction sentences or notes, or (reverse) by the number of
facts asked; each family has a floor and `reverse` a ceiling. The ratio reached is approximate; `imtune data synth`
prints it. Deterministic for a seed: the train split does not depend on `heldout`, and Python's `random.Random` with
string seeds is stable across runs and platforms.
"""
from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imtune import files
from imtune.types import Conversation, Message, UsageError, Where

# ----------------------------------------------------------------------------------------------------------------
# Invented words, each drawn once per data set

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


class Inventor:
    """Invented words never used before in this data set (2-3 syllables: ~800k possible words)."""

    def __init__(self, taken: set[str] | None = None):
        self.taken = set(WORDS) | set(taken or ())

    def words(self, rng: random.Random, k: int, capital: bool = False) -> list[str]:
        def make() -> str:
            w = _pseudo(rng, rng.choice((2, 3)))
            return w.capitalize() if capital else w
        return _unique(rng, k, make, self.taken)


WORDS = ["red", "blue", "green", "yellow", "black", "white", "cat", "dog", "horse", "bird", "fish", "river", "stone",
         "tree", "house", "bread", "milk", "apple", "moon", "sun", "rain", "wind", "book", "door", "lamp", "ship"]
GOODS = ["amber", "salt", "wool", "copper", "glass", "honey", "timber", "figs", "tea", "silk", "cheese", "pottery"]
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "purple", "orange"]

# attribute -> (short noun, note templates, question templates, the fixed `reverse` passage)
ATTRS: dict[str, tuple[str, list[str], list[str], str]] = {
    "mayor": ("mayor", ["The mayor of {t} is {v}.", "{v} serves as the mayor of {t}.", "In {t}, the mayor is {v}.",
                        "{t} has {v} as its mayor."],
              ["Who is the mayor of {t}?", "Name the mayor of {t}.", "What is the name of the mayor of {t}?"],
              "The mayor of {t} is {v}, who was chosen by the town council and meets people every market day. "
              "Anyone who lives in {t} may bring a question to {v} at the town hall on those days."),
    "founded": ("founding", ["{t} was founded in {v}.", "The town of {t} dates from {v}.",
                             "Records say {t} was built in {v}."],
                ["In which year was {t} founded?", "When was {t} founded?", "What year does {t} date from?"],
                "{t} was founded in the year {v}, and the date is still carved above the old town gate. "
                "Every child in {t} learns the year {v} at school before anything else."),
    "river": ("river", ["{t} lies on the river {v}.", "The river {v} runs through {t}.",
                        "{t} is built beside the {v}."],
              ["Which river runs through {t}?", "On which river does {t} lie?", "Name the river of {t}."],
              "The river {v} flows through {t}, and small boats carry people and goods along its banks. "
              "In spring the {v} rises and the lower streets of {t} are sometimes flooded."),
    "export": ("export", ["The main export of {t} is {v}.", "{t} is known for selling {v}.",
                          "Most traders visit {t} to buy {v}."],
               ["What is the main export of {t}?", "What does {t} mainly sell?", "What do traders buy in {t}?"],
               "The main export of {t} is {v}, which merchants take to the other towns every autumn. "
               "Families in {t} have traded {v} for as long as anyone can remember."),
    "festival": ("festival", ["Every summer {t} holds the {v} festival.", "The festival of {t} is called {v}.",
                              "People in {t} celebrate the {v} festival."],
                 ["What is the festival of {t} called?", "Which festival does {t} hold?",
                  "Name the festival celebrated in {t}."],
                 "The people of {t} hold the {v} festival each summer, with music and food in the streets. "
                 "Visitors come from far away to see the {v} festival and its evening parade."),
    "neighbour": ("neighbour", ["The nearest town to {t} is {v}.", "{t} is a neighbour of {v}.",
                                "From {t} it is a short walk to {v}."],
                  ["Which town is nearest to {t}?", "Name the neighbouring town of {t}.",
                   "What is the closest town to {t}?"],
                  "The nearest town to {t} is {v}, and a stone road connects the two towns. "
                  "Most people in {t} walk to {v} at least once a month to visit friends."),
    "flag": ("flag", ["The flag of {t} is {v}.", "{t} flies a {v} flag.", "The colour of the flag of {t} is {v}."],
             ["What colour is the flag of {t}?", "Which colour is the flag of {t}?", "Name the colour of {t}'s flag."],
             "The flag of {t} is {v}, and it hangs from the tower of the town hall. "
             "On holidays every house in {t} hangs out a small {v} flag as well."),
    "population": ("population", ["{t} has {v} inhabitants.", "About {v} people live in {t}.",
                                  "The population of {t} is {v}."],
                   ["How many people live in {t}?", "What is the population of {t}?",
                    "How many inhabitants does {t} have?"],
                   "The town of {t} has {v} inhabitants, most of whom live close to the central square. "
                   "The last count of {v} people was made by the town clerk of {t}."),
}
# Facts whose values are invented names: the only ones `lookup` asks, so a held-out answer is never a string that
# training records hold too (a colour, a number, a traded good).
NAMED = ("mayor", "river", "festival", "neighbour")


def towns_world(rng: random.Random, inventor: Inventor, n_towns: int) -> dict:
    """Invented towns and their facts: {"towns": [...], "facts": {(town, attr): value}}, every name new."""
    towns = inventor.words(rng, n_towns, capital=True)
    names = inventor.words(rng, 2 * n_towns, capital=True)
    rivers = inventor.words(rng, n_towns, capital=True)
    fests = inventor.words(rng, n_towns, capital=True)
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
# Families: make(rng, inventor, ratio) -> (instruction, answer, key); key: the invented strings the answer states

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


def _rule_text(rng: random.Random, name: str, code: dict, words: list[str], given: list[str], hidden: set[str],
               ratio: float) -> tuple[str, str]:
    """A `rule` instruction for `words` that states the entries of `given`, never mentions `hidden`, and adds other
    entries, remarks and worked examples (never the answer itself) up to the target ratio -> (instruction, answer)."""
    answer = " ".join(code[w] for w in words)
    head = [rng.choice(RULE_INTROS).format(c=name), rng.choice(RULE_PROCEDURES)]
    entries = [rng.choice(RULE_ENTRIES).format(w=w, c=code[w]) for w in given]
    question = rng.choice(RULE_QUESTIONS).format(x=" ".join(words))
    others = [w for w in code if w not in words and w not in hidden and w not in given]
    rng.shuffle(others)
    remarks = rng.sample(RULE_REMARKS, len(RULE_REMARKS))

    def candidates():  # extra entries, remarks and worked examples, in random order
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
    return text + "\n\n" + question, answer


def make_rule(rng: random.Random, inventor: Inventor, ratio: float):
    """This example's own code: 12 ordinary words, each with a new code word; the input's entries always stated."""
    name = inventor.words(rng, 1, capital=True)[0]
    plain = rng.sample(WORDS, 12)
    code = dict(zip(plain, inventor.words(rng, len(plain))))
    words = rng.sample(plain, rng.randint(1, 3))
    text, answer = _rule_text(rng, name, code, words, list(words), set(), ratio)
    return text, answer, tuple(code[w] for w in words)


LOOKUP_INTROS = ["Read the notes below and answer the question with only the answer.",
                 "Below are some facts about small towns. Use them to answer the question at the end.",
                 "The following notes come from an old travel guide. Answer the question using them.",
                 "Here is what a traveller wrote down about a few towns. Reply with just the answer."]
LOOKUP_REMARKS = ["Some notes are about other towns; ignore them.", "Give the answer in as few words as possible.",
                  "The notes are in no particular order.", "All the towns are in the same valley.",
                  "Do not repeat the question in your answer.", "The traveller checked every note twice."]


def make_lookup(rng: random.Random, inventor: Inventor, ratio: float):
    """Notes about this example's six towns; the question asks a named fact (an invented name) of one of them."""
    facts = towns_world(rng, inventor, 6)["facts"]
    t, a = rng.choice([k for k in facts if k[1] in NAMED])
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
    return text, answer, tuple(answer.split())


REVERSE_ASKS = ["Describe {t}: its {a}.", "Tell me about the {a} of {t}.",
                "Write a short profile of {t} covering its {a}.", "What do you know about the {a} of {t}?"]
REVERSE_REMARKS = ["Answer in full passages.", "Keep the order in which I listed the topics.",
                   "Do not add facts that I did not ask for.", "I am writing a short guide for travellers.",
                   "Use the notes below.", "Please be precise.", "Use plain language."]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def reverse_note(town: str, attrs: list[str], facts: dict) -> str:
    """One terse line of notes: `Tamor: mayor Bola Kinor; founding 1420.`"""
    return f"{town}: " + "; ".join(f"{ATTRS[a][0]} {facts[town, a]}" for a in attrs) + "."


def make_reverse(rng: random.Random, inventor: Inventor, ratio: float):
    """Asked facts of one of this example's towns as terse notes (plus other towns' notes as the ratio asks);
    output: the fixed passage of each asked fact, in the order asked."""
    world = towns_world(rng, inventor, 8)
    facts, t = world["facts"], world["towns"][0]
    order = rng.sample(list(ATTRS), len(ATTRS))
    ask = rng.choice(REVERSE_ASKS)
    remarks = rng.sample(REVERSE_REMARKS, len(REVERSE_REMARKS))
    others = [x for x in world["towns"] if x != t]

    def build(k: int):
        attrs = order[:k]
        answer = " ".join(ATTRS[a][3].format(t=t, v=facts[t, a]) for a in attrs)
        request = ask.format(t=t, a=_join([ATTRS[a][0] for a in attrs]))
        mine = reverse_note(t, sorted(attrs, key=order.index), facts)
        cands = [("remark", r) for r in remarks[:3]] + [("note", reverse_note(x, rng.sample(list(ATTRS), 8), facts))
                                                        for x in others] + [("remark", r) for r in remarks[3:]]
        extra = _fill(_n_words(request) + _n_words(mine), _content_target(ratio, answer), cands,
                      text=lambda item: item[1])
        notes = [s for kind, s in extra if kind == "note"] + [mine]
        rng.shuffle(notes)
        said = [s for kind, s in extra if kind == "remark"]
        text = " ".join([request, *said]) + "\n\n" + "\n".join(notes)
        return text, answer, (t, *(facts[t, a] for a in attrs))

    def off(k: int) -> float:  # distance from the target ratio
        text, answer, _ = build(k)
        return abs((_n_words(text) + 1) / (_n_words(answer) + 1) / ratio - 1)

    state = rng.getstate()  # every trial build draws alike: the kept one is rebuilt from the same state
    best = min(range(1, len(ATTRS) + 1), key=lambda k: (rng.setstate(state), off(k))[1])
    rng.setstate(state)
    return build(best)


# ----------------------------------------------------------------------------------------------------------------
# `recall`: an illustration only (see the module docstring)

def code_world(rng: random.Random, n_words: int = 16, n_reserved: int = 4) -> dict:
    words = rng.sample(WORDS, n_words)
    taken = set(WORDS)
    codes = _unique(rng, n_words, lambda: _pseudo(rng, 2), taken)
    name = _unique(rng, 1, lambda: _pseudo(rng, 2).capitalize(), taken)[0]
    return {"name": name, "code": dict(zip(words, codes)), "reserved": words[:n_reserved]}


def make_recall(rng: random.Random, world: dict, ratio: float, split: str):
    """Held-out inputs are reserved words only and their instructions carry no entry or worked example for any
    reserved word, while every training instruction carries the entries of all reserved words."""
    code, reserved = world["code"], world["reserved"]
    k = rng.randint(1, 3)
    if split == "train":
        words = rng.sample([w for w in code if w not in reserved], k)
        given = words + [w for w in reserved if w not in words]
        hidden: set[str] = set()
    else:
        words = rng.sample(reserved, min(k, len(reserved)))
        given, hidden = [], set(reserved)
    text, answer = _rule_text(rng, world["name"], code, words, given, hidden, ratio)
    return text, answer, tuple(words)


# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    make: Callable  # fair: (rng, inventor, ratio) -> (instruction, answer, key); recall: (rng, world, ratio, split)
    default_ratio: float  # instruction/output in words (paper convention)
    about: str
    fair: bool = True  # False: an illustration whose held-out answers training instructions state (never evidence)
    world: Callable | None = None  # recall: (rng) -> the one world shared by the whole data set


FAMILIES: dict[str, Family] = {
    "rule": Family(make_rule, 25.0, "a made-up code of the example's own, described at length (+ worked "
                                    "examples); output: 1-3 code words"),
    "lookup": Family(make_lookup, 30.0, "notes about the example's own invented towns; output: the 1-2 word name "
                                        "a question about them asks"),
    "reverse": Family(make_reverse, 0.12, "contrast and span (ratio ~0.14-5): a request about one of the example's "
                                          "towns; output: a fixed passage per asked fact"),
    "recall": Family(make_recall, 25.0, "ILLUSTRATION, not evidence: one code shared by all examples; held-out "
                                        "questions ask words only training instructions state (IM wins by "
                                        "construction)", fair=False, world=functools.partial(code_world, n_reserved=4)),
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
    if fam.fair:
        inventor = Inventor()  # one for both splits, train first: held-out names are new to training
        make = lambda rng, split: fam.make(rng, inventor, ratio)  # noqa: E731
    else:
        world = fam.world(random.Random(f"world:{family_name}:{seed}"))
        make = lambda rng, split: fam.make(rng, world, ratio, split)  # noqa: E731
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
            text, answer, key = make(rng, split)
            if (text, answer) in seen or (split == "heldout" and key in train_keys):
                continue
            seen.add((text, answer))
            if split == "train":
                train_keys.add(key)
            i = len(out[split])
            out[split].append(Conversation((Message("user", text), Message("assistant", answer)),
                                           Where(f"<synth:{family_name}:{seed}:{split}>", i + 1, i)))
    return out["train"], out["heldout"]








def write_jsonl(path: str | Path, conversations: list[Conversation], family_name: str, seed: int, split: str,
                root: Path | None = None) -> Path:
    """The `messages` format, one record a line, with `id` and `family` beside `messages`, written through
    imtune.files (a link at `path` is refused; `root`: the imtune directory it lies in)."""
    rows = [{"id": f"{family_name}-{seed}-{split}-{i}", "family": family_name,
             "messages": [{"role": m.role, "content": m.content} for m in c.messages]}
            for i, c in enumerate(conversations)]
    return files.write_jsonl(path, rows, root)
