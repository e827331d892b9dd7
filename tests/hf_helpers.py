"""Shared by the transformers integration tests."""

import torch


class TokenWindows(torch.utils.data.Dataset):
    """``n`` fixed windows of ``seq`` random token ids (seed 3), labels = inputs: a Trainer dataset."""

    def __init__(self, n: int, seq: int, vocab: int = 128):
        self.x = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(3))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}
