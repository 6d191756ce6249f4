"""A TinyStories-format file of generated stories, for measuring the data pipeline at full size offline.

    python bench/make_tinystories.py OUT.txt --mb 1000 --seed 0

Writes stories separated by `<|endoftext|>` lines, as the release's TinyStories-train.txt is laid out, until
the file holds at least --mb megabytes (10**6 bytes): about a million distinct stories per GB. The same
seed writes the same bytes. The stories come from `picollm.data.stories` (the English-like text that
`pico-llm bench` tokenizes).
"""

from __future__ import annotations

import argparse
import sys
import time

from picollm.data.stories import write_stories


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
