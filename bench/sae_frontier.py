"""The SAE frontier of one hook point: one SAE per (dictionary size, k), each trained with `pico-llm sae
train`, then explained variance and CE loss recovered against L0, one line per dictionary size.

    python bench/sae_frontier.py RUN --site blocks.0.mlp.hook_post --features 256,512,1024 --k 8,16,32 \\
        --tokens 2000000 --out DIR

Writes DIR/features=N,k=K/ (an SAE directory each: `pico-llm sae report` reads it), DIR/frontier.md (the
table) and DIR/frontier.png. A point whose directory already holds metrics.json is kept, not retrained
(pass --overwrite to retrain it), so an interrupted frontier resumes. A k above a dictionary size is skipped.
(The sweep runner varies `train` flags only; SAE settings get this script instead.)
"""

import argparse
import os
import sys

from picollm.analysis.sae import read_metrics
from picollm.cli import main as pico
from picollm.errors import PicoError
from picollm.fsio import write_text
from picollm.plots import metrics_vs_param
from picollm.tables import md_table

COLUMNS = ("features", "k", "l0", "explained_variance", "ce_loss_recovered", "kl_div", "dead_fraction",
           "dense_fraction")


def int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"positive integers, got {text!r}")
    return vals


def train_point(a: argparse.Namespace, n: int, k: int) -> dict:
    """One SAE (trained unless its directory has metrics already); its metrics with features and k."""
    out = os.path.join(a.out, f"features={n},k={k}")
    if a.overwrite or not read_metrics(out):
        argv = ["sae", "train", a.run, "--site", a.site, "--features", str(n), "--k", str(k), "--tokens",
                str(a.tokens), "--device_id", a.device_id, "--out", out, "--no_progress", *a.train_args]
        if a.overwrite:
            argv.append("--overwrite")
        print(f"== features={n} k={k}", flush=True)
        if pico(argv) != 0:
            raise SystemExit(f"sae train failed for features={n} k={k}")
    else:
        print(f"== features={n} k={k}: kept ({out} has metrics)")
    return {"features": n, "k": k, **read_metrics(out)}


def cell(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "–" if v is None else str(v)


def write_frontier(rows: list[dict], out: str, title: str) -> None:
    table = md_table(COLUMNS, [[cell(r.get(c)) for c in COLUMNS] for r in rows], align=["r"] * len(COLUMNS))
    write_text(os.path.join(out, "frontier.md"), f"# {title}\n\n{table}")
    metrics_vs_param(rows, "l0", [["explained_variance"], ["ce_loss_recovered"]],
                     os.path.join(out, "frontier.png"), series="features", title=title)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run directory")
    ap.add_argument("--site", required=True, help="the hook point, e.g. blocks.0.mlp.hook_post")
    ap.add_argument("--features", type=int_list, default=[256, 512, 1024], help="dictionary sizes (default 256,512,1024)")
    ap.add_argument("--k", type=int_list, default=[8, 16, 32], help="TopK values (default 8,16,32)")
    ap.add_argument("--tokens", type=int, default=2_000_000, help="activation vectors each SAE trains on")
    ap.add_argument("--device_id", default="cpu")
    ap.add_argument("--out", required=True, help="the frontier's directory")
    ap.add_argument("--overwrite", action="store_true", help="retrain points that have metrics already")
    ap.epilog = "After --: more `sae train` flags for every point (-- --lr 3e-4 --batch_tokens 2048)."
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:cut])
    a.train_args = argv[cut + 1:]
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for n in a.features:
        for k in a.k:
            if k > n:
                print(f"== features={n} k={k}: skipped (k above the dictionary size)")
                continue
            rows.append(train_point(a, n, k))
    if not rows:
        raise SystemExit("no (features, k) point with k <= features")
    write_frontier(rows, a.out, f"SAE frontier: {a.site} of {os.path.basename(os.path.normpath(a.run))}")
    print(f"wrote {os.path.join(a.out, 'frontier.md')} and frontier.png")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PicoError as e:
        sys.exit(f"error: {e}")
