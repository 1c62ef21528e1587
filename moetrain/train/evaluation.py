"""Validation sums: next-token cross-entropy, and the comparison of a model with a reference model on the same
tokens. One definition for the trainer (any engine, all-reduced), exported models and the tests.

Shape legend: B batch, S sequence, V vocabulary, T = B * S tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

# the entries of :func:`comparison_sums`, in order
COMPARISON = ("ce", "ce_ref", "kl", "agree", "tokens")


def token_cross_entropy(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Per token, ``-log softmax(z_t)[y_t]`` in fp32 (T,)."""
    log_p_TV = F.log_softmax(logits_BSV.float().flatten(0, 1), dim=-1)
    return -log_p_TV.gather(1, labels_BS.flatten()[:, None]).squeeze(1)


def cross_entropy_sums(
    forward: Callable[[torch.Tensor], object], batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device
) -> torch.Tensor:
    """``[sum of next-token cross-entropy (nats), number of tokens]`` over ``batches`` as float64: sums, so
    ranks (or simulated ranks) add them up before the one division. ``forward`` returns a ``ModelOutput``."""
    totals = torch.zeros(2, dtype=torch.float64)
    for inputs, labels in batches:
        ce_T = token_cross_entropy(forward(inputs.to(device)).logits_BSV, labels.to(device))
        totals += torch.stack([ce_T.double().sum().cpu(), torch.tensor(float(labels.numel()), dtype=torch.float64)])
    return totals


def comparison_sums(logits_BSV: torch.Tensor, reference_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """One batch of a model (logits ``z``) against a reference (logits ``r``) on the same tokens, as float64
    sums over its T tokens (``COMPARISON``: ranks and batches add them up before the one division):

    - ``ce``     = sum_t -log p_z(y_t)                                the model's cross-entropy;
    - ``ce_ref`` = sum_t -log p_r(y_t)                                the reference's;
    - ``kl``     = sum_t sum_v p_r(v | t) (log p_r(v | t) - log p_z(v | t))   KL(reference || model);
    - ``agree``  = sum_t [argmax_v r_t(v) = argmax_v z_t(v)]          top-1 next-token agreement;
    - ``tokens`` = T;

    with ``p = softmax(logits)`` (temperature 1), per-token values in fp32. Means over tokens are ``x / T``."""
    labels_T = labels_BS.flatten()[:, None]
    log_p_TV = F.log_softmax(logits_BSV.float().flatten(0, 1), dim=-1)
    log_r_TV = F.log_softmax(reference_BSV.float().flatten(0, 1), dim=-1)
    ce_T = -log_p_TV.gather(1, labels_T).squeeze(1)
    ce_ref_T = -log_r_TV.gather(1, labels_T).squeeze(1)
    kl_T = F.kl_div(log_p_TV, log_r_TV, log_target=True, reduction="none").sum(-1)
    agree_T = logits_BSV.flatten(0, 1).argmax(-1) == reference_BSV.flatten(0, 1).argmax(-1)
    parts = [ce_T, ce_ref_T, kl_T, agree_T]
    sums = [x.double().sum() for x in parts] + [torch.tensor(float(labels_T.shape[0]), dtype=torch.float64)]
    return torch.stack([x.cpu() for x in sums])
