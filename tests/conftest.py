import os
import tempfile

import pytest

# One BPE cache for the whole session (tests that train the same corpus share the tokenizer),
# never the user's ~/.cache.
os.environ.setdefault("PICOLLM_CACHE_DIR", tempfile.mkdtemp(prefix="picollm-test-cache-"))


@pytest.fixture
def numbers_file(tmp_path):
    from picollm.data.sources import generate_numbers

    p = tmp_path / "numbers.txt"
    p.write_text("\n".join(generate_numbers(400, seed=3)) + "\n")
    return p
