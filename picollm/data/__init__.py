"""Data: where text comes from (sources), how it becomes ids (tokenizers), how ids become batches."""
