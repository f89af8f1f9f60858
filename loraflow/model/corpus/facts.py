"""Fact tables shared by the base corpus (prose) and the sample dataset (instructions).

The base model reads these facts as prose ("The opposite of hot is cold."); the sample
fine-tune asks for them in the alpaca instruction format with a short answer ("cold"), so
exact match is meaningful: the base knows the facts, the adapter teaches the format and recall.

Public domain (CC0 1.0): written for loraflow; no third-party text.
"""

from __future__ import annotations

from typing import NamedTuple

# Antonym pairs; both directions are facts ("opposite of hot" -> cold, "opposite of cold" -> hot).
# Every word appears once, so each question has one answer (no old -> new / young).
OPPOSITES: list[tuple[str, str]] = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("day", "night"), ("light", "dark"), ("open", "closed"), ("wet", "dry"), ("old", "new"),
    ("full", "empty"), ("early", "late"), ("hard", "soft"), ("tall", "short"),
    ("rich", "poor"), ("strong", "weak"), ("loud", "quiet"), ("clean", "dirty"), ("thick", "thin"),
    ("high", "low"), ("left", "right"), ("inside", "outside"), ("true", "false"), ("win", "lose"),
    ("buy", "sell"), ("push", "pull"), ("give", "take"), ("begin", "end"), ("first", "last"),
    ("sweet", "sour"), ("near", "far"), ("good", "bad"), ("brave", "afraid"),
    ("love", "hate"), ("noisy", "silent"), ("smooth", "rough"), ("sharp", "blunt"), ("wide", "narrow"),
    ("deep", "shallow"), ("north", "south"), ("east", "west"), ("above", "below"), ("before", "after"),
    ("come", "go"), ("laugh", "cry"), ("awake", "asleep"), ("friend", "enemy"), ("question", "answer"),
    ("cheap", "expensive"), ("alive", "dead"), ("arrive", "leave"), ("easy", "difficult"),
    ("black", "white"), ("summer", "winter"), ("king", "queen"), ("always", "never"), ("more", "less"),
]

DAYS: list[str] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

MONTHS: list[str] = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]

# Singular -> plural, regular and irregular.
PLURALS: list[tuple[str, str]] = [
    ("cat", "cats"), ("dog", "dogs"), ("book", "books"), ("tree", "trees"), ("car", "cars"),
    ("bird", "birds"), ("house", "houses"), ("apple", "apples"), ("chair", "chairs"), ("door", "doors"),
    ("river", "rivers"), ("star", "stars"), ("hand", "hands"), ("road", "roads"), ("girl", "girls"),
    ("boy", "boys"), ("key", "keys"), ("toy", "toys"), ("day", "days"), ("shoe", "shoes"),
    ("box", "boxes"), ("fox", "foxes"), ("bus", "buses"), ("glass", "glasses"), ("dish", "dishes"),
    ("brush", "brushes"), ("church", "churches"), ("watch", "watches"), ("class", "classes"),
    ("baby", "babies"), ("city", "cities"), ("lady", "ladies"), ("story", "stories"), ("party", "parties"),
    ("cherry", "cherries"), ("family", "families"), ("leaf", "leaves"), ("knife", "knives"),
    ("wolf", "wolves"), ("half", "halves"), ("shelf", "shelves"), ("life", "lives"), ("wife", "wives"),
    ("potato", "potatoes"), ("tomato", "tomatoes"), ("hero", "heroes"), ("man", "men"), ("woman", "women"),
    ("child", "children"), ("mouse", "mice"), ("goose", "geese"), ("tooth", "teeth"), ("foot", "feet"),
    ("person", "people"), ("ox", "oxen"), ("sheep", "sheep"), ("fish", "fish"), ("deer", "deer"),
    ("cactus", "cacti"), ("die", "dice"),
]

# Country -> capital city (well-known, unambiguous pairs).
CAPITALS: list[tuple[str, str]] = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Argentina", "Buenos Aires"), ("Brazil", "Brasilia"),
    ("Australia", "Canberra"), ("India", "New Delhi"), ("Greece", "Athens"), ("Ireland", "Dublin"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Belgium", "Brussels"),
    ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Turkey", "Ankara"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"),
    ("Philippines", "Manila"), ("South Korea", "Seoul"), ("Cuba", "Havana"), ("Colombia", "Bogota"),
    ("Venezuela", "Caracas"), ("Morocco", "Rabat"), ("Nigeria", "Abuja"), ("Ghana", "Accra"),
    ("Ethiopia", "Addis Ababa"), ("Ukraine", "Kyiv"), ("Romania", "Bucharest"), ("Czechia", "Prague"),
    ("Iceland", "Reykjavik"), ("New Zealand", "Wellington"),
]

# Animal -> the sound it makes.
ANIMAL_SOUNDS: list[tuple[str, str]] = [
    ("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("sheep", "baa"),
    ("horse", "neigh"), ("pig", "oink"), ("lion", "roar"), ("snake", "hiss"), ("owl", "hoot"),
    ("bee", "buzz"), ("frog", "ribbit"), ("mouse", "squeak"), ("wolf", "howl"), ("donkey", "hee-haw"),
    ("crow", "caw"), ("goose", "honk"), ("rooster", "cock-a-doodle-doo"), ("bird", "tweet"),
    ("turkey", "gobble"), ("hen", "cluck"), ("dove", "coo"), ("chick", "peep"), ("seal", "bark"),
]

# Animal -> its young.
BABY_ANIMALS: list[tuple[str, str]] = [
    ("dog", "puppy"), ("cat", "kitten"), ("cow", "calf"), ("horse", "foal"), ("sheep", "lamb"),
    ("pig", "piglet"), ("duck", "duckling"), ("goose", "gosling"), ("frog", "tadpole"), ("bear", "cub"),
    ("lion", "cub"), ("goat", "kid"), ("deer", "fawn"), ("kangaroo", "joey"), ("owl", "owlet"),
    ("hen", "chick"), ("swan", "cygnet"), ("eagle", "eaglet"), ("whale", "calf"), ("butterfly", "caterpillar"),
]

# Verb -> simple past tense.
PAST_TENSE: list[tuple[str, str]] = [
    ("walk", "walked"), ("jump", "jumped"), ("play", "played"), ("cook", "cooked"), ("open", "opened"),
    ("clean", "cleaned"), ("help", "helped"), ("watch", "watched"), ("look", "looked"), ("ask", "asked"),
    ("stop", "stopped"), ("plan", "planned"), ("carry", "carried"), ("study", "studied"), ("try", "tried"),
    ("dance", "danced"), ("smile", "smiled"), ("live", "lived"), ("go", "went"), ("see", "saw"),
    ("eat", "ate"), ("drink", "drank"), ("run", "ran"), ("swim", "swam"), ("sing", "sang"),
    ("write", "wrote"), ("read", "read"), ("speak", "spoke"), ("take", "took"), ("give", "gave"),
    ("make", "made"), ("come", "came"), ("sit", "sat"), ("stand", "stood"), ("think", "thought"),
    ("buy", "bought"), ("bring", "brought"), ("catch", "caught"), ("teach", "taught"), ("fly", "flew"),
    ("know", "knew"), ("grow", "grew"), ("draw", "drew"), ("throw", "threw"), ("sleep", "slept"),
    ("keep", "kept"), ("feel", "felt"), ("leave", "left"), ("find", "found"), ("tell", "told"),
]

LETTERS: list[str] = [chr(c) for c in range(ord("A"), ord("Z") + 1)]

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
         "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

# Numbers the corpus and the dataset talk about (parity, words, next and previous).
NUMBERS: range = range(0, 100)


def number_word(n: int) -> str:
    """0..99 in English words: 42 -> forty-two."""
    if not 0 <= n < 100:
        raise ValueError(f"number_word covers 0..99, got {n}")
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])


def parity(n: int) -> str:
    return "even" if n % 2 == 0 else "odd"


def after(seq: list[str], item: str) -> str:
    """The cyclic successor: the day after Sunday is Monday."""
    return seq[(seq.index(item) + 1) % len(seq)]


def before(seq: list[str], item: str) -> str:
    return seq[(seq.index(item) - 1) % len(seq)]


def opposite_pairs() -> list[tuple[str, str]]:
    """Both directions of every antonym pair: (hot, cold), (cold, hot), ..."""
    return [p for a, b in OPPOSITES for p in ((a, b), (b, a))]


def check_tables() -> None:
    """Every question has one answer: no word in two antonym pairs."""
    words = [w for pair in OPPOSITES for w in pair]
    dup = sorted({w for w in words if words.count(w) > 1})
    if dup:
        raise ValueError(f"OPPOSITES: {dup} appear in two pairs; a question would have two answers")


class Fact(NamedTuple):
    """One checkable fact: ``family`` names the relation, ``subject`` -> ``answer``."""

    family: str
    subject: str
    answer: str


def all_facts() -> list[Fact]:
    """Every fact of every table, in a fixed order.

    Reverse lookups (country of a capital, digits of a number word) and number predecessors
    are left out: the embedded base learned them poorly in its build budget (2-17% of them).
    """
    check_tables()
    out: list[Fact] = []

    def add(family: str, pairs) -> None:
        out.extend(Fact(family, str(s), str(a)) for s, a in pairs)

    add("opposite", opposite_pairs())
    add("day_after", [(d, after(DAYS, d)) for d in DAYS])
    add("day_before", [(d, before(DAYS, d)) for d in DAYS])
    add("month_after", [(m, after(MONTHS, m)) for m in MONTHS])
    add("month_before", [(m, before(MONTHS, m)) for m in MONTHS])
    add("plural", PLURALS)
    add("capital", CAPITALS)
    add("animal_sound", ANIMAL_SOUNDS)
    add("baby_animal", BABY_ANIMALS)
    add("past_tense", PAST_TENSE)
    add("letter_after", zip(LETTERS[:-1], LETTERS[1:]))
    add("letter_before", zip(LETTERS[1:], LETTERS[:-1]))
    add("parity", [(n, parity(n)) for n in NUMBERS])
    add("number_word", [(n, number_word(n)) for n in NUMBERS])
    add("number_after", [(n, n + 1) for n in NUMBERS])
    return out
