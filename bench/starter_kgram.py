"""The course starter's k-gram MLP, kept literally as the baseline of `pico-llm bench`'s kgram_vs_loop:
one Python iteration per position and per batch element, each building a flattened k x V one-hot vector
and running it through Linear(k*V, C) -> SiLU -> [Linear -> SiLU]* -> Linear(C, V). Same sizes, same
parameter count as picollm's KGramMLP (onehot variant), which computes the first Linear as a sum of k
weight rows over the whole batch at once."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class StarterKGramMLP(nn.Module):
    def __init__(self, vocab_size, k=3, embed_size=1024, num_inner_layers=1):
        super().__init__()
        self.k, self.vocab_size = k, vocab_size
        layers = [nn.Linear(k * vocab_size, embed_size), nn.SiLU()]
        for _ in range(num_inner_layers):
            layers += [nn.Linear(embed_size, embed_size), nn.SiLU()]
        layers.append(nn.Linear(embed_size, vocab_size))
        self.net = nn.Sequential(*layers)

    def forward(self, tokens_seq, positions=None):
        """tokens_seq: (T, B), sequence-first as in the starter; logits (T', B, V) for the first
        `positions` positions (all by default)."""
        seq_len, batch_size = tokens_seq.shape
        outputs = []
        for t in range(seq_len if positions is None else positions):
            batch_logits = []
            for b in range(batch_size):
                if t < self.k:
                    context_ids = [0] * (self.k - t) + tokens_seq[:t, b].tolist()
                else:
                    context_ids = tokens_seq[t - self.k:t, b].tolist()
                context_oh = F.one_hot(torch.tensor(context_ids, dtype=torch.long), num_classes=self.vocab_size)
                context_flat = context_oh.flatten().float().unsqueeze(0)
                batch_logits.append(self.net(context_flat))  # (1, V)
            outputs.append(torch.cat(batch_logits, dim=0).unsqueeze(0))
        return torch.cat(outputs, dim=0)
