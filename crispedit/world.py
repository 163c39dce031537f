"""The demo world: invented people, five relations, and narrative text about them.

Everything is generated from a seed, so the demo model's training data, the edit requests and the
capability corpora can be rebuilt exactly. Each relation has three prompt templates: the first two
are trained, the third is never trained and measures generalisation. Neighbour prompts (same
relation, another person) measure locality. Training documents mix narrative sentences (which
mention people but state none of their facts) with fact sentences in the trained templates; the
curvature corpus is drawn from those documents, as the paper draws it from pretraining text. The
held-out slice is narrative never trained or used for curvature, and states no fact, so the drift
measured on it is collateral damage only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SEED = 1234
PEOPLE = 320

RELATIONS: dict[str, tuple[list[str], list[str]]] = {
    # name: (templates, the third never trained; objects)
    "city": (
        ["{} lives in the city of", "The home town of {} is", "{} has a house in"],
        ["Tavor", "Mirrow Falls", "Ostrel", "Port Avel", "Kesh", "Dunmere", "Valloc", "Saint Irun", "Brevin",
         "Olmouth", "Harrowgate", "Lisk", "New Carra", "Fennick", "Zorrin", "Quell Bay"],
    ),
    "job": (
        ["{} works as a", "By trade , {} is a", "Every morning {} goes to work as a"],
        ["baker", "ship builder", "glass blower", "teacher", "miller", "tailor", "map maker", "beekeeper",
         "potter", "lamp lighter", "weaver", "clock mender", "gardener", "ferry pilot"],
    ),
    "colour": (
        ["The favourite colour of {} is", "{} likes the colour", "{} painted the front door"],
        ["red", "blue", "green", "amber", "violet", "silver", "deep orange", "pale yellow", "black", "white",
         "sea green", "rose"],
    ),
    "language": (
        ["{} speaks", "The mother tongue of {} is", "{} writes letters in"],
        ["Velish", "Ostran", "Carrese", "Old Dunmeric", "Tavish", "Lumbric", "Serran", "Kethi", "High Avellan",
         "Moorish Brev"],
    ),
    "pet": (
        ["The pet of {} is a", "{} owns a pet", "Every evening {} feeds a"],
        ["cat", "dog", "owl", "red fox", "tortoise", "parrot", "hare", "goat", "grey goose", "ferret", "pony",
         "hedgehog"],
    ),
}
TRAINED_TEMPLATES = 2

_SYLLABLES = ["ba", "ren", "tor", "li", "ma", "vos", "ke", "dri", "an", "sel", "mo", "rik", "ta", "fen", "ul",
              "na", "gor", "e", "vin", "so", "bel", "kar", "di", "lom", "pa", "ther", "ju", "cas", "wy", "ost"]
_SURNAMES = ["Abbot", "Marlow", "Quince", "Harrel", "Dunning", "Fairweather", "Okonkwo", "Lindqvist",
             "Varga", "Moreau", "Castellan", "Brightwater", "Pell", "Szabo", "Tamsin", "Ward"]

_NARRATIVE = [
    "{a} walked to the {place} with a basket of {food} .",
    "On a {weather} day , {a} met {b} near the {place} .",
    "{a} told {b} a long story about the {thing} .",
    "The {thing} that {a} found was old and {adj} .",
    "{a} and {b} shared some {food} at the {place} .",
    "After the rain , {a} cleaned the {thing} and sat by the {place} .",
    "{a} asked {b} to bring the {thing} to the {place} .",
    "It was {weather} , so {a} stayed near the {place} all afternoon .",
    "{b} laughed when {a} dropped the {thing} .",
    "The {adj} {thing} belonged to {a} , but {b} wanted it .",
    "{a} counted {number} {food} and gave them to {b} .",
    "Later that night , {a} wrote about the {adj} {place} .",
    "{a} waited at the {place} for {number} hours .",
    "When {b} arrived , {a} was reading about the {thing} .",
]
_FILL = {
    "place": ["market", "river", "old bridge", "library", "harbour", "square", "mill", "hill", "garden", "station",
              "bakery", "school", "forest path", "well"],
    "food": ["apples", "bread", "cheese", "plums", "fish", "cakes", "onions", "pears", "nuts", "berries"],
    "weather": ["cold", "windy", "bright", "grey", "warm", "quiet", "foggy"],
    "thing": ["lantern", "letter", "map", "box", "coin", "key", "book", "kite", "rope", "bell", "mirror", "coat"],
    "adj": ["small", "strange", "heavy", "bright", "broken", "quiet", "lovely", "dusty", "curious"],
    "number": ["two", "three", "four", "five", "six", "seven", "ten", "twelve"],
}


@dataclass(frozen=True)
class Fact:
    person: str
    relation: str
    object: str

    def prompt(self, template: int) -> str:
        return RELATIONS[self.relation][0][template].format(self.person)


@dataclass
class World:
    people: list[str]
    facts: list[Fact]  # one per (person, relation)
    train_documents: list[str]  # narrative mixed with fact sentences (trained templates)
    heldout_narrative: list[str]  # narrative only, never trained

    def fact(self, person: str, relation: str) -> Fact:
        return self._index[(person, relation)]

    def __post_init__(self) -> None:
        self._index = {(f.person, f.relation): f for f in self.facts}


def _names(rng: random.Random, n: int) -> list[str]:
    names: set[str] = set()
    while len(names) < n:
        first = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 2, 3)))).capitalize()
        names.add(f"{first} {rng.choice(_SURNAMES)}")
    return sorted(names)


def _narrative(rng: random.Random, people: list[str], sentences: int) -> list[str]:
    out = []
    for _ in range(sentences):
        a, b = rng.sample(people, 2)
        fill = {k: rng.choice(v) for k, v in _FILL.items()}
        out.append(rng.choice(_NARRATIVE).format(a=a, b=b, **fill))
    return out


def _mixed(rng: random.Random, people: list[str], facts: list[Fact]) -> str:
    """Narrative sentences with two to four fact sentences (trained templates) placed among them."""
    sentences = _narrative(rng, people, rng.randint(3, 6))
    for _ in range(rng.randint(2, 4)):
        sentences.insert(rng.randint(0, len(sentences)), fact_text(rng.choice(facts), rng.randrange(TRAINED_TEMPLATES)))
    return " ".join(sentences)


def build_world(seed: int = SEED, people: int = PEOPLE, train_docs: int = 3000, heldout_docs: int = 300) -> World:
    """The people, one fact per person and relation, training documents and held-out narrative."""
    rng = random.Random(seed)
    names = _names(rng, people)
    facts = [Fact(p, r, rng.choice(objs)) for p in names for r, (_, objs) in RELATIONS.items()]
    train = [_mixed(rng, names, facts) for _ in range(train_docs)]
    held = [" ".join(_narrative(rng, names, rng.randint(3, 6))) for _ in range(heldout_docs)]
    return World(names, facts, train, held)


def fact_text(f: Fact, template: int) -> str:
    return f"{f.prompt(template)} {f.object} ."


def vocabulary(world: World) -> list[str]:
    """Every word and punctuation mark the world uses (word-level tokenizer)."""
    words: set[str] = set()
    texts = [fact_text(f, t) for f in world.facts[: len(RELATIONS)] for t in range(3)]
    texts += [t for r in RELATIONS.values() for t in r[0]] + [o for r in RELATIONS.values() for o in r[1]]
    texts += world.people + _NARRATIVE + [w for v in _FILL.values() for w in v]
    for t in texts:
        words.update(t.replace("{}", " ").replace("{", " ").replace("}", " ").split())
    return sorted(words)
