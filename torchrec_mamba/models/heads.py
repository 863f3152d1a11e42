"""Output heads of the sequential recommenders: tied full softmax and sampled softmax (logQ).

Shape letters: T number of training targets in a batch, D width, I number of candidate rows
(items 1..num_items, or categories), S number of sampled negatives.

Both heads are *tied*: they own no parameters and score with embeddings that the model looked up
through its ``EmbeddingCollection`` (feature ``"item_candidates"`` of table ``"item"``), so the
same code runs with an unsharded table and with a table sharded by ``DistributedModelParallel``,
where the fused optimizer only updates rows that went through a lookup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FullSoftmaxHead", "SampledSoftmaxConfig", "SampledSoftmaxHead", "masked_mean"]


def check_label_smoothing(value: object) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``value`` unless it is a float in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"label_smoothing must be a float in [0, 1), got {value!r}")
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1), got {value!r}")


def masked_mean(per_target: Tensor) -> Tensor:
    """Mean of ``per_target`` (T,) that is still connected to the graph when T == 0 (then 0)."""
    if per_target.numel() == 0:
        return per_target.sum()  # 0.0, keeps the autograd graph (and DDP's static graph) intact
    return per_target.mean()


class FullSoftmaxHead(nn.Module):
    """Cross-entropy over every candidate: ``logits = user @ candidates.T`` (tied weights).

    Candidate row ``j`` stands for id ``j + 1`` (id 0 is padding and never a class).

    Args:
        logits_dtype (torch.dtype | None): dtype of the training product ``user @ candidates.T``
            (e.g. ``torch.bfloat16``: several times faster on CPUs with AVX512-BF16 and on
            GPUs); the softmax and the loss stay float32. None: the inputs' dtype. Default: None.
        label_smoothing (float): in [0, 1): the target distribution puts ``1 - eps`` on the
            target and spreads ``eps`` uniformly over all I candidates
            (``F.cross_entropy(label_smoothing=eps)``). Training loss only; scores and
            metrics are unchanged. Default: 0.0.

    Example::

        >>> head = FullSoftmaxHead()
        >>> user, cand = torch.randn(3, 4), torch.randn(5, 4)
        >>> targets = torch.tensor([1, 5, 2])
        >>> loss = head(user, cand, targets)
        >>> ref = F.cross_entropy(user @ cand.T, targets - 1)
        >>> torch.allclose(loss, ref)
        True
    """

    def __init__(self, logits_dtype: torch.dtype | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if logits_dtype not in (None, torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"FullSoftmaxHead: unsupported logits_dtype {logits_dtype}")
        check_label_smoothing(label_smoothing)
        self.logits_dtype = logits_dtype
        self.label_smoothing = float(label_smoothing)

    def forward(self, user: Tensor, candidates: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy of the targets.

        Args:
            user (Tensor): (T, D) user representations, one per target.
            candidates (Tensor): (I, D) embeddings of ids 1..I.
            targets (Tensor): (T,) target ids in 1..I.

        Returns:
            Tensor: scalar mean loss (0 when T == 0, still differentiable).
        """
        dtype = self.logits_dtype
        if dtype is not None and dtype != user.dtype:
            # The (T, I) product is most of a training step; bf16 inputs with a float32 softmax
            # is the usual mixed-precision recipe (evaluation scores stay in float32).
            logits = (user.to(dtype) @ candidates.to(dtype).t()).float()  # (T, I)
        else:
            logits = user @ candidates.t()  # (T, I)
        per_target = F.cross_entropy(logits, targets.long() - 1, reduction="none",
                                     label_smoothing=self.label_smoothing)  # (T,)
        return masked_mean(per_target)

    @staticmethod
    def scores(user: Tensor, candidates: Tensor) -> Tensor:
        """Full-ranking scores with column 0 (padding) set to ``-inf``.

        Args:
            user (Tensor): (B, D).
            candidates (Tensor): (I, D) embeddings of ids 1..I.

        Returns:
            Tensor: (B, I + 1).
        """
        logits = user @ candidates.t()  # (B, I)
        padding = logits.new_full((logits.shape[0], 1), float("-inf"))  # (B, 1)
        return torch.cat([padding, logits], dim=1)  # (B, I + 1)


@dataclass(frozen=True)
class SampledSoftmaxConfig:
    """Settings of :class:`SampledSoftmaxHead` (for catalogues too large for a full softmax).

    Args:
        num_negatives (int): negatives S drawn per batch (shared by every target of the batch).
            Default: 1000.
        proposal_alpha (float): the proposal is ``q(i) ∝ count(i) ** alpha`` when item counts are
            given to the model (``alpha = 0`` is uniform); without counts it is uniform.
            Default: 1.0.
        logq_correction (bool): subtract ``log(S * q(i))`` from every logit (positive and
            negatives), which makes the sampled loss an unbiased-in-the-limit estimate of the full
            softmax (Bengio & Senécal 2008; Yi et al. 2019). Default: True.
        remove_accidental_hits (bool): drop a negative from a target's logits when it is that
            target's own item. Default: True.

    Example::

        >>> SampledSoftmaxConfig(num_negatives=64).num_negatives
        64
    """

    num_negatives: int = 1000
    proposal_alpha: float = 1.0
    logq_correction: bool = True
    remove_accidental_hits: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.num_negatives, int) or self.num_negatives < 1:
            raise ValueError(f"num_negatives must be an int >= 1, got {self.num_negatives!r}")
        if self.proposal_alpha < 0 or not math.isfinite(self.proposal_alpha):
            raise ValueError(f"proposal_alpha must be finite and >= 0, got {self.proposal_alpha}")


class SampledSoftmaxHead(nn.Module):
    """Sampled softmax with shared negatives and optional logQ correction (tied weights).

    For target ``t`` with positive item ``p`` and shared negatives ``n_1..n_S`` drawn from ``q``::

        logits = [u·e_p, u·e_n1, ..., u·e_nS] - log(S q(.))      (with logq_correction)
        loss_t = -log softmax(logits)[0]

    Args:
        config (SampledSoftmaxConfig): the settings.

    Example::

        >>> head = SampledSoftmaxHead(SampledSoftmaxConfig(num_negatives=3, logq_correction=False))
        >>> user, pos, neg = torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 4)
        >>> targets, negatives = torch.tensor([1, 2]), torch.tensor([3, 4, 1])
        >>> log_q = torch.full((5,), -1.0)
        >>> loss = head(user, pos, neg, targets, negatives, log_q)
        >>> loss.shape
        torch.Size([])
    """

    def __init__(self, config: SampledSoftmaxConfig) -> None:
        super().__init__()
        self.config = config

    def forward(
        self,
        user: Tensor,
        positives: Tensor,
        negatives_emb: Tensor,
        targets: Tensor,
        negatives: Tensor,
        log_q: Tensor,
    ) -> Tensor:
        """Mean sampled-softmax loss.

        Args:
            user (Tensor): (T, D) user representations.
            positives (Tensor): (T, D) embeddings of the targets.
            negatives_emb (Tensor): (S, D) embeddings of the sampled negatives.
            targets (Tensor): (T,) target ids.
            negatives (Tensor): (S,) sampled ids.
            log_q (Tensor): (I + 1,) log proposal probability of every id (entry 0 unused).

        Returns:
            Tensor: scalar mean loss (0 when T == 0, still differentiable).
        """
        pos_logit = (user * positives).sum(-1, keepdim=True)  # (T, 1)
        neg_logit = user @ negatives_emb.t()  # (T, S)
        if self.config.logq_correction:
            log_s = math.log(negatives.numel())
            pos_logit = pos_logit - (log_q[targets.long()] + log_s)[:, None]  # (T, 1)
            neg_logit = neg_logit - (log_q[negatives.long()] + log_s)[None, :]  # (T, S)
        if self.config.remove_accidental_hits:
            hit = targets.long()[:, None] == negatives.long()[None, :]  # (T, S)
            neg_logit = neg_logit.masked_fill(hit, float("-inf"))
        logits = torch.cat([pos_logit, neg_logit], dim=1)  # (T, 1 + S)
        per_target = -torch.log_softmax(logits, dim=1)[:, 0]  # (T,)
        return masked_mean(per_target)
