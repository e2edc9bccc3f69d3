"""Floor 2: a synthetic named-entity-recognition corpus, tagged BIO per character.

Sentences come from templates with typed slots (``"{PER} flew to {LOC} on {DATE}."``) filled
from entity lists. The tokenizer here reads characters, so the tags are per character, in the
BIO scheme: ``B-TYPE`` on an entity's first character, ``I-TYPE`` on the rest of it (spaces
inside "New York" too), ``O`` outside every entity:

    Ada Lovelace paid $40 ...
    B-PER I-PER ... (12 chars) O B-MONEY I-MONEY I-MONEY O ...

Every entity pool is cut into train / validation / test parts before any sentence is made, so
no entity string of the test split appears in training (for persons, no first name and no
surname does): a model must recognise entities from their context and shape, not remember them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .tasks import IGNORE_INDEX
from .text import pick_split, random_indices
from .vocab import encode_padded, text_tokenizer

ENTITY_TYPES = ("PER", "LOC", "ORG", "DATE", "MONEY")
LABEL_NAMES = ("O",) + tuple(f"{bi}-{t}" for t in ENTITY_TYPES for bi in "BI")
SPLITS = ("train", "val", "test")

FIRST_NAMES = """Ada Alan Grace Linus Barbara Donald Edsger Frances Guido Hedy Ivan John Katherine
Leslie Margaret Niklaus Ole Radia Shafi Tim Vint Whitfield Yukihiro Anita Bjarne Claude Dennis
Elena Fernando Gilles Hanna Ingrid Jean Karen Lotfi Marvin Nadia Omar Peter Rosa Sophie Tomas
Ursula Victor Wendy Xavier Yasmin Zoe""".split()
SURNAMES = """Lovelace Turing Hopper Torvalds Liskov Knuth Dijkstra Allen Rossum Lamarr Sutherland
McCarthy Johnson Lamport Hamilton Wirth Dahl Perlman Goldwasser Berners Cerf Diffie Matsumoto
Borg Stroustrup Shannon Ritchie Moreau Corbato Kahn Novak Lindqvist Okafor Tanaka Brandt Kowalski
Petrov Silva Ferreira Dubois Jansen Larsen Haddad Costa Weber Nguyen Murphy Rossi""".split()
CITIES = """Paris|London|Berlin|Madrid|Rome|Vienna|Prague|Warsaw|Lisbon|Dublin|Oslo|Helsinki|
Athens|Cairo|Nairobi|Lagos|Accra|Tokyo|Osaka|Seoul|Beijing|Mumbai|Delhi|Karachi|Jakarta|Manila|
Sydney|Perth|Auckland|Toronto|Montreal|Chicago|Boston|Denver|Seattle|Houston|Lima|Quito|Bogota|
New York|Buenos Aires|Cape Town|Rio de Janeiro|San Francisco|Mexico City|Hong Kong|Tel Aviv|
Kuala Lumpur|Abu Dhabi|Los Angeles|Santiago|Havana|Reykjavik|Zurich|Geneva|Brussels|Riga|Kyiv"""
CITIES = [c.strip() for c in CITIES.split("|")]
ORG_ROOTS = """Acme|Globex|Initech|Umbrella|Stark|Wayne|Tyrell|Cyberdyne|Aperture|Hooli|Vandelay|
Soylent|Nakatomi|Oscorp|Wonka|Gringotts|Monarch|Abstergo|Virtucon|Massive Dynamic|Blue Sun|Black Mesa|
Pied Piper|Dunder Mifflin|Sirius|Northwind|Contoso|Fabrikam|Tailspin|Litware|Adatum|Wingtip|
Proseware|Lucerne|Margie|Woodgrove|Fourth Coffee|Alpine Ski|Coho|Trey"""
ORG_ROOTS = [r.strip() for r in ORG_ROOTS.split("|")]
ORG_SUFFIXES = ("Corp", "Bank", "Group", "Labs", "Systems", "Airlines", "Foundation", "Inc")
MONTHS = """January February March April May June July August September October November
December""".split()

TEMPLATES = (
    "{PER} flew to {LOC} on {DATE}.",
    "{PER} joined {ORG} in {LOC}.",
    "{ORG} paid {MONEY} to {PER} on {DATE}.",
    "On {DATE}, {PER} left {ORG}.",
    "{LOC} is where {PER} met the board of {ORG}.",
    "The office of {ORG} in {LOC} opened on {DATE}.",
    "{PER} owes {MONEY} to {ORG}.",
    "{ORG} moved from {LOC} to {LOC} on {DATE}.",
    "A fine of {MONEY} was paid by {ORG}.",
    "{MONEY} was wired to {LOC} by {PER}.",
    "{DATE}: {ORG} hired {PER}.",
    "{PER} and {PER} visited {LOC}.",
    "{LOC} welcomed {PER} on {DATE}.",
    "Shares of {ORG} fell by {MONEY} on {DATE}.",
    "{PER} said {ORG} earned {MONEY}.",
    "In {LOC}, {ORG} sued {PER} for {MONEY}.",
)
_SLOT = re.compile(r"\{(" + "|".join(ENTITY_TYPES) + r")\}")


def bio_tags(text: str, spans) -> list:
    """Character-level BIO tags of ``text`` whose entities are ``spans``, a list of
    (start, end, type) with ``text[start:end]`` the entity (end exclusive, non-overlapping)."""
    tags = ["O"] * len(text)
    for start, end, kind in spans:
        if not 0 <= start < end <= len(text) or any(t != "O" for t in tags[start:end]):
            raise ValueError(f"span ({start}, {end}, {kind!r}) is empty, outside the text of "
                             f"length {len(text)}, or overlaps another")
        tags[start:end] = [f"B-{kind}"] + [f"I-{kind}"] * (end - start - 1)
    return tags


def fill_template(template: str, entities: dict, rng: np.random.Generator) -> tuple:
    """One sentence from ``template``, each ``{TYPE}`` slot filled by a random string of
    ``entities[TYPE]``: returns (text, spans) with spans as in ``bio_tags``."""
    text, spans, last = "", [], 0
    for match in _SLOT.finditer(template):
        text += template[last:match.start()]
        kind = match.group(1)
        value = entities[kind][rng.integers(len(entities[kind]))]
        spans.append((len(text), len(text) + len(value), kind))
        text += value
        last = match.end()
    return text + template[last:], spans


def _cut(items, rng, fractions=(0.6, 0.2, 0.2)) -> dict:
    """Shuffle ``items`` and cut them into disjoint {"train", "val", "test"} lists."""
    items = [items[i] for i in rng.permutation(len(items))]
    a = int(round(len(items) * fractions[0]))
    b = a + int(round(len(items) * fractions[1]))
    return dict(zip(SPLITS, (items[:a], items[a:b], items[b:])))


def entity_pools(seed: int = 0) -> dict:
    """{split: {TYPE: [entity strings]}}; the three splits share no string (and no first name,
    surname, organisation root, year or amount)."""
    rng = np.random.default_rng(seed)
    first, last = _cut(FIRST_NAMES, rng), _cut(SURNAMES, rng)
    cities, roots = _cut(CITIES, rng), _cut(ORG_ROOTS, rng)
    years, amounts = _cut(list(range(1950, 2031)), rng), _cut(list(range(1, 1000)), rng)
    pools = {}
    for s in SPLITS:
        pools[s] = {
            "PER": [f"{f} {l}" for f in first[s] for l in last[s]],
            "LOC": cities[s],
            "ORG": [f"{r} {suffix}" for r in roots[s] for suffix in ORG_SUFFIXES],
            "DATE": [d for y in years[s] for m in MONTHS for d in (f"{1 + (y * 7 + len(m)) % 28} {m} {y}",
                                                                    f"{m} {1 + (y * 3 + len(m)) % 28}, {y}")],
            "MONEY": [m for a in amounts[s] for m in (f"${a}", f"{a} euros", f"${a},000")],
        }
    return pools


@dataclass
class NERExample:
    text: str
    spans: list   # [(start, end, type)], text[start:end] is the entity


class NERCorpus:
    """Sentences with character-level BIO tags, in train / val / test splits.

    Args:
        n_train, n_val, n_test: sentences per split.
        block_size: the padded width of a row; every sentence fits in it.
        seed: seeds the entity cut and the sentences.

    Attributes:
        tokenizer (the shared ``text_tokenizer()``), label_names (``LABEL_NAMES``), num_labels,
        block_size, sentences: {split: [NERExample]}.
    """

    def __init__(self, n_train: int = 4000, n_val: int = 400, n_test: int = 400,
                 block_size: int = 88, seed: int = 0):
        self.tokenizer = text_tokenizer()
        self.label_names, self.num_labels, self.block_size = LABEL_NAMES, len(LABEL_NAMES), block_size
        self._label_id = {name: i for i, name in enumerate(LABEL_NAMES)}
        pools = entity_pools(seed)
        rng = np.random.default_rng([seed, 1])
        self.sentences = {}
        for split, n in zip(SPLITS, (n_train, n_val, n_test)):
            picks = rng.integers(len(TEMPLATES), size=n)
            self.sentences[split] = [NERExample(*fill_template(TEMPLATES[t], pools[split], rng)) for t in picks]
        self._arrays = {s: self._encode(self.sentences[s]) for s in SPLITS}

    def _encode(self, examples) -> tuple:
        x, lengths = encode_padded(self.tokenizer, [e.text for e in examples], self.block_size)
        labels = np.full(x.shape, IGNORE_INDEX, dtype=np.int64)
        for row, e in enumerate(examples):
            labels[row, :len(e.text)] = [self._label_id[t] for t in bio_tags(e.text, e.spans)]
        return x, labels

    def get_batch(self, split: str, batch_size: int, rng: np.random.Generator) -> tuple:
        """(x (B, block_size) ids padded with END_CHAR, labels (B, block_size) label ids with
        -100 on padding)."""
        x, labels = pick_split(self._arrays, split)
        rows = random_indices(rng, len(x), batch_size)
        return x[rows], labels[rows]

    def examples(self, split: str) -> tuple:
        """The whole split: (x (N, block_size), labels (N, block_size))."""
        x, labels = pick_split(self._arrays, split)
        return x.copy(), labels.copy()

    def tag_sequences(self, label_ids) -> list:
        """Label ids (N, T) -> lists of tag strings, each cut at its -100 padding."""
        out = []
        for row in np.asarray(label_ids):
            out.append([self.label_names[i] for i in row[row != IGNORE_INDEX]])
        return out
