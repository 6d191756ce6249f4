#!/usr/bin/env python3
"""The course starter's entry point, unchanged flags: python pico-llm.py --input_files 3seqs.txt ..."""

import sys

from picollm.cli import classic_main

if __name__ == "__main__":
    sys.exit(classic_main())
