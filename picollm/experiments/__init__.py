"""Studies built on `train()`: sweeps over train flags (sweep.py), comparisons of finished or running
runs (compare.py) and a self-contained HTML report of a run or a sweep (report.py)."""
