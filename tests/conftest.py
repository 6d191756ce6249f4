import os
import tempfile

import pytest
import torch

# One BPE cache for the whole session (tests that train the same corpus share the tokenizer),
# never the user's ~/.cache.
os.environ.setdefault("PICOLLM_CACHE_DIR", tempfile.mkdtemp(prefix="picollm-test-cache-"))

# Several torch processes on a small machine oversubscribe its cores badly (10x slower and worse):
# PICOLLM_TEST_THREADS=1 keeps a test run to one thread when other work shares the machine.
if os.environ.get("PICOLLM_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["PICOLLM_TEST_THREADS"]))


@pytest.fixture
def numbers_file(tmp_path):
    from picollm.data.sources import generate_numbers

    p = tmp_path / "numbers.txt"
    p.write_text("\n".join(generate_numbers(400, seed=3)) + "\n")
    return p
