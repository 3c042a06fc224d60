"""The per-example causal-LM loss: low-precision logits are upcast to fp32 a block of tokens at a
time (issue 13 item 5), with the same losses and gradients as the whole upcast at once."""
import torch
import torch.nn.functional as F

from dpnotes.privacy import losses
from dpnotes.prompting import IGNORE_INDEX


def test_blockwise_fp32_cross_entropy_equals_the_whole_upcast(monkeypatch):
    monkeypatch.setattr(losses, "LOSS_BLOCK_TOKENS", 4)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, 50, generator=gen).bfloat16().requires_grad_()
    labels = torch.randint(0, 50, (3, 11), generator=gen)
    labels[1, 3:7] = IGNORE_INDEX
    blockwise = losses.token_cross_entropy(logits, labels)
    (grad,) = torch.autograd.grad((blockwise * torch.arange(11.0)).sum(), logits)
    whole = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="none").view(labels.shape)
    (expected,) = torch.autograd.grad((whole * torch.arange(11.0)).sum(), logits)
    assert blockwise.dtype == torch.float32 and torch.equal(blockwise, whole)
    assert torch.equal(grad, expected)
