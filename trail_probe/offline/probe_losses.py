"""The probes' training losses (`train.loss`), for one probe's logits [B, K] and a stack's [B, n, K] alike.

    loss = training_loss(logits, labels, lengths, hp, class_weight, bins)   # [] or [n], each probe's own

- ce: the paper's cross-entropy over the length bins (balanced_ce: bins weighted by inverse training
  frequency; `label_smoothing` smooths the targets);
- emd: the squared earth mover's distance between the predicted and the true bin CDFs (ordinal);
- rank: cross-entropy plus `rank_weight` times `rank_loss`, a pairwise ranking loss on the expected
  lengths within the batch.

Labels are bin indices [B], or distributions over the bins [B, K] (the prompt probe's soft labels,
`train.prompt_labels=soft`); `lengths` [B] are the lengths the labels were binned from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def emd_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample ordinal loss [...]: the squared earth mover's distance between the predicted bin
    distribution and the true bin (Hou et al. 2016, "Squared EMD loss"): sum over bins of
    (CDF_pred - CDF_true)^2, so mass one bin off costs less than mass far off. Same softmax head,
    same export; `logits` [..., K], `labels` [...] bin indices or [..., K] target distributions
    (broadcast against logits' leading dims)."""
    cdf = logits.float().softmax(-1).cumsum(-1)
    if labels.is_floating_point():
        target = labels.float().cumsum(-1)
    else:
        target = (torch.arange(logits.shape[-1], device=logits.device) >= labels[..., None]).float()
    return ((cdf - target) ** 2).sum(-1)


def rank_loss(logits: torch.Tensor, lengths: torch.Tensor, bins) -> torch.Tensor:
    """The pairwise ranking loss of the expected lengths E = sum_i p_i m_i in a batch: the mean over the
    pairs (a, b) whose true lengths differ, a the longer, of softplus(-(E_a - E_b) / w), w the bin width.
    [] for logits [B, K], [n] for a stack's [B, n, K].

    Why this form: a scheduler orders requests by E (TRAIL's point estimate), so the loss acts on E itself,
    not on the argmax bin; the logistic pairwise loss (RankNet's, as PARS trains its ranker) costs a pair
    log 2 when tied, grows linearly when it is ordered the wrong way and fades once the right order holds
    by a few bin widths, so its gradient goes to the pairs a scheduler would swap; measured in bin
    widths, it is the same at any max_len. It is added to cross-entropy rather than used alone because
    an order is blind to a shift or scale of every E, and TRAIL needs calibrated lengths too (the MAE,
    the Bayes refinement, limited preemption at C times the initial estimate). Pairs come from the
    training batch itself: B(B-1)/2 of them per step at no extra pass over the data; pairs of equal
    length (ties) carry no order and are left out."""
    est = logits.float().softmax(-1) @ bins.midpoints.to(device=logits.device)  # [B] or [B, n] tokens
    longer = lengths[:, None] > lengths[None, :]  # [B, B]: a's true length > b's
    pairs = longer.sum()
    gap = (est[:, None] - est[None, :]) / bins.width  # [B, B(, n)]: E_a - E_b in bin widths
    mask = longer.reshape(longer.shape + (1,) * (gap.dim() - 2)).float()
    return (F.softplus(-gap) * mask).sum((0, 1)) / pairs.clamp_min(1)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None,
                   smoothing: float) -> torch.Tensor:
    """Cross-entropy reduced as `F.cross_entropy(..., reduction="mean")` reduces it, per probe of a stack."""
    if logits.dim() == 2:
        return F.cross_entropy(logits, labels, label_smoothing=smoothing, weight=weight)
    n, soft = logits.shape[1], labels.is_floating_point()
    target = labels[:, :, None].expand(-1, -1, n) if soft else labels[:, None].expand(-1, n)  # [B, K, n] or [B, n]
    per = F.cross_entropy(logits.permute(0, 2, 1), target, weight=weight, label_smoothing=smoothing,
                          reduction="none")  # [B, n]
    return per.sum(0) / (weight[labels].sum() if weight is not None and not soft else labels.shape[0])


def training_loss(logits: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor, hp, class_weight: torch.Tensor,
                  bins) -> torch.Tensor:
    """`train.loss` of a batch: [] for one probe's logits [B, K], [n] for a stack's [B, n, K] (each probe's
    own, so a stack's summed loss gives each probe its own gradient). `hp`: the module's hyperparameters
    (loss, label_smoothing, rank_weight)."""
    logits = logits.float()
    if hp.loss == "emd":
        per = emd_loss(logits, labels[:, None] if logits.dim() == 3 else labels)
        return per.mean(0) if logits.dim() == 3 else per.mean()
    weight = class_weight if hp.loss == "balanced_ce" else None
    loss = _cross_entropy(logits, labels, weight, hp.label_smoothing)
    if hp.loss == "rank":
        loss = loss + hp.rank_weight * rank_loss(logits, lengths, bins)
    return loss
