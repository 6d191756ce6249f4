"""A TinyStories-format file of generated stories, for measuring the data pipeline at full size offline.

    python bench/make_tinystories.py OUT.txt --mb 1000 --seed 0

Writes stories separated by `<|endoftext|>` lines, as the release's TinyStories-train.txt is laid out, until
the file holds at least --mb megabytes (10**6 bytes): about 1,000 bytes per story, so about a million
distinct stories per GB. The same seed writes the same bytes. English-like text: story-shaped sentences
over about a thousand distinct words (names, animals, things, places, feelings): a small vocabulary, as TinyStories' is.
Fast: sentences are rendered once into a bank and stories drawn from it with numpy (about 90 MB/s on an
idle laptop core).
"""

from __future__ import annotations

import argparse
import sys
import time

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


def _sentences(rng: np.random.Generator, n: int) -> list[str]:
    """n story sentences with the hero as HERO; a few templates over the word lists."""
    def pick(words, k):
        return np.asarray(words, dtype=object)[rng.integers(0, len(words), k)]

    a1, a2, t1, t2, p1 = pick(ANIMALS, n), pick(ANIMALS, n), pick(THINGS, n), pick(THINGS, n), pick(PLACES, n)
    j1, j2, f1, v1, v2, m1 = pick(ADJS, n), pick(ADJS, n), pick(FEELINGS, n), pick(VERBS, n), pick(VERBS, n), \
        pick(MOVES, n)
    n2, kinds = pick(NAMES, n), rng.integers(0, 10, n)
    h = HERO
    out = []
    for i in range(n):
        k = kinds[i]
        if k == 0:
            s = f"One day, {h} went to the {p1[i]} with a {j1[i]} {t1[i]}."
        elif k == 1:
            s = f"{h} saw a {j1[i]} {a1[i]} near the {p1[i]}."
        elif k == 2:
            s = f'"Can I play with your {t1[i]}?" asked the {a1[i]}. {h} said, "Yes, let\'s share!"'
        elif k == 3:
            s = f"The {a1[i]} {m1[i]} to the {p1[i]} and {v1[i]} a {j2[i]} {t2[i]}."
        elif k == 4:
            s = f"{h} felt {f1[i]} because the {t1[i]} was {j1[i]}."
        elif k == 5:
            s = f"{n2[i]} {v1[i]} the {t1[i]}, and {h} {v2[i]} the {t2[i]}."
        elif k == 6:
            s = f"Then a {j1[i]} {a2[i]} came and {m1[i]} around the {p1[i]}."
        elif k == 7:
            s = f'"Look at the {j1[i]} {t1[i]}!" said {h}. "It is so {j2[i]}!"'
        elif k == 8:
            s = f"{h} and {n2[i]} {m1[i]} all the way to the {j1[i]} {p1[i]}."
        else:
            s = f"The {a1[i]} was {f1[i]}, so {h} gave it a {t1[i]}."
        out.append(s)
    return out


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the .txt file to write")
    p.add_argument("--mb", type=float, default=100.0, help="size in megabytes (10**6 bytes)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    t = time.perf_counter()
    stories, n = write_stories(a.out, a.mb, a.seed)
    dt = time.perf_counter() - t
    print(f"wrote {stories:,} stories, {n / 1e6:,.1f} MB to {a.out} in {dt:.1f} s ({n / 1e6 / dt:,.0f} MB/s)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
