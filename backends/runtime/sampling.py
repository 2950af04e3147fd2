"""Next-token sampling from logits: greedy, or temperature with top-k and top-p (nucleus),
seeded. The filters run in llama-cpp-python's order (top-k, top-p on the untempered
distribution, then temperature)."""

from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> int:
    """logits [V] -> one token id. temperature 0 is greedy (argmax); top_k 0 keeps all."""
    logits = logits.float().cpu()  # [V]: cheap, and the generator lives on the CPU
    if temperature <= 0:
        return int(torch.argmax(logits))
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(logits / temperature, -1)
    return int(torch.multinomial(probs, 1, generator=generator))
