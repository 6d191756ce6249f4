"""Generated TinyStories-like stories: English-like text for measuring the data pipeline and the tokenizer
at full size offline (`bench/make_tinystories.py` writes them to a file; `pico-llm bench` tokenizes them).

Story-shaped sentences over about a thousand distinct words (names, animals, things, places, feelings): a
small vocabulary, as TinyStories' is. About 1,000 bytes per story, so about a million distinct stories per
GB. The same seed gives the same stories. Fast: sentences are rendered once into a bank and stories drawn
from it with numpy (about 90 MB/s on an idle laptop core).
"""

from __future__ import annotations

import numpy as np

EOT_LINE = "<|endoftext|>\n"
HERO = "\x00"  # stands for the story's hero in the sentence bank; replaced per story

NAMES = ("Lily Tim Ben Mia Sam Anna Max Sue Tom Lucy Jack Zoe Leo Emma Jake Amy Finn Ella Kim Bob Mom Dad "
         "Grandpa Grandma Sara Joe Molly Rex Daisy Spot Ollie Rosie Timmy Sally Billy Jenny Lucas Nora Henry "
         "Chloe Oscar Ruby Jasper Hazel Felix Ivy Hugo Poppy Milo Luna Theo Stella Arlo Willow Otis Piper "
         "Buddy Coco Pip Bella Charlie Sophie Peter Alice").split()
ANIMALS = ("dog cat bird bunny fox bear frog duck mouse lion owl fish puppy kitten turtle horse cow pig sheep "
           "squirrel butterfly bee ant snail elephant monkey tiger deer goose giraffe zebra penguin dolphin whale "
           "crab hamster parrot goat donkey chicken rabbit wolf raccoon hedgehog ladybug dragon unicorn").split()
THINGS = ("ball kite toy car boat hat box book cake apple flower tree rock shell stick doll train drum cup "
          "blanket balloon crayon sandwich cookie jar key map bell wagon slide swing leaf star pencil basket "
          "bucket shovel bike puzzle robot teddy bear umbrella sock shoe button ribbon pillow lamp clock "
          "spoon bowl candle picture letter present ring necklace feather pebble acorn banana carrot").split()
PLACES = ("park garden forest house school beach river hill farm pond zoo kitchen yard lake town market "
          "playground meadow cave room village field shop barn tower bridge castle island library bakery "
           "mountain jungle desert street bus station hospital garage attic tent nest").split()
ADJS = ("big small happy sad little red blue green shiny soft loud quiet kind brave silly funny pretty old "
        "new tall tiny warm cold bright dark sweet gentle fast slow curious sleepy hungry busy fluffy "
        "sparkly colorful wet dry heavy light smooth rough strong clever grumpy cheerful shy wild "
        "yellow purple pink orange brown golden magic special lovely noisy").split()
FEELINGS = "happy sad scared excited proud sorry angry surprised tired glad calm lonely".split()
VERBS = ("played with|looked at|found|lost|shared|wanted|liked|saw|made|painted|hugged|carried|threw|"
         "caught|fixed|cleaned|hid|picked up|gave away|followed|built|opened|dropped|kicked|pulled|pushed|"
         "washed|tasted|smelled|counted|drew|wrapped|borrowed|returned").split("|")
MOVES = "ran|jumped|walked|danced|hopped|swam|flew|climbed|rolled|skipped|raced|wandered|tiptoed|crawled".split("|")
ENDINGS = ("From that day on, {h} was never {f} again.|They all lived happily ever after.|"
           "{h} learned that sharing is good.|It was the best day ever.|{h} smiled and went to sleep.|"
           "{h} and the {a} became best friends.|The end.").split("|")


SENTENCES = (  # {h} is the hero; the other fields are drawn per sentence
    "One day, {h} went to the {p1} with a {j1} {t1}.",
    "{h} saw a {j1} {a1} near the {p1}.",
    '"Can I play with your {t1}?" asked the {a1}. {h} said, "Yes, let\'s share!"',
    "The {a1} {m1} to the {p1} and {v1} a {j2} {t2}.",
    "{h} felt {f1} because the {t1} was {j1}.",
    "{n2} {v1} the {t1}, and {h} {v2} the {t2}.",
    "Then a {j1} {a2} came and {m1} around the {p1}.",
    '"Look at the {j1} {t1}!" said {h}. "It is so {j2}!"',
    "{h} and {n2} {m1} all the way to the {j1} {p1}.",
    "The {a1} was {f1}, so {h} gave it a {t1}.",
)
FIELDS = {"a1": ANIMALS, "a2": ANIMALS, "t1": THINGS, "t2": THINGS, "p1": PLACES, "j1": ADJS, "j2": ADJS,
          "f1": FEELINGS, "v1": VERBS, "v2": VERBS, "m1": MOVES, "n2": NAMES}


def _sentences(rng: np.random.Generator, n: int) -> list[str]:
    """n story sentences with the hero as HERO: SENTENCES over the word lists."""
    drawn = {k: np.asarray(words, dtype=object)[rng.integers(0, len(words), n)] for k, words in FIELDS.items()}
    kinds = rng.integers(0, len(SENTENCES), n)
    return [SENTENCES[kinds[i]].format(h=HERO, **{k: v[i] for k, v in drawn.items()}) for i in range(n)]


class StoryWriter:
    """Stories drawn from a bank of sentences: an opening, 10..22 sentences, an ending."""

    def __init__(self, seed: int, bank_size: int = 50_000):
        self.rng = np.random.default_rng(seed)
        self.bank = np.asarray([" " + s for s in _sentences(self.rng, bank_size)], dtype=object)

    def batch(self, n: int) -> str:
        """n stories in the file's layout, each followed by an <|endoftext|> line."""
        rng = self.rng
        heroes = np.asarray(NAMES, dtype=object)[rng.integers(0, len(NAMES), n)]
        what = np.asarray(ADJS, dtype=object)[rng.integers(0, len(ADJS), n)]
        animals = np.asarray(ANIMALS, dtype=object)[rng.integers(0, len(ANIMALS), n)]
        feel = np.asarray(FEELINGS, dtype=object)[rng.integers(0, len(FEELINGS), n)]
        ends = rng.integers(0, len(ENDINGS), n)
        counts = rng.integers(10, 23, n)
        picks = rng.integers(0, len(self.bank), (n, 22))
        parts = []
        for i in range(n):
            h = heroes[i]
            body = "".join(self.bank[picks[i, : counts[i]]]).replace(HERO, h)
            end = ENDINGS[ends[i]].format(h=h, f=feel[i], a=animals[i])
            parts.append(f"Once upon a time, there was a {what[i]} {animals[i]} named {h}.{body}\n{end}\n{EOT_LINE}")
        return "".join(parts)


def write_stories(path: str, mb: float, seed: int = 0, chunk: int = 20_000) -> tuple[int, int]:
    """Writes stories to path until it holds at least mb * 10**6 bytes; returns (stories, bytes)."""
    target, written, stories = int(mb * 1_000_000), 0, 0
    w = StoryWriter(seed)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        while written < target:
            text = w.batch(chunk)
            data = text.encode("utf-8")
            if written + len(data) > target:  # the last batch: stop at the first story past the target
                cut = data.find(EOT_LINE.encode(), target - written)
                data = data[: cut + len(EOT_LINE)] if cut >= 0 else data
            f.write(data.decode("utf-8"))
            written += len(data)
            stories += data.count(EOT_LINE.encode())
    return stories, written


def story_texts(n: int, seed: int = 0) -> list[str]:
    """n stories as the documents a TinyStories loader yields for them (whitespace-stripped)."""
    return [t for t in (s.strip() for s in StoryWriter(seed).batch(n).split(EOT_LINE)) if t]
