"""Looking inside trained models: attention maps and head scores (attention.py), embedding
neighbours and k-means clusters (neighbors.py)."""
