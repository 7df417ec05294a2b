"""Model merging's mathematics on task vectors ``tau_k = theta_k - theta_0``, as small pure functions.

Every method folds the task vectors in one at a time into a running state of a fixed size, so merging any
number of tasks keeps a fixed number of parameter-sized tensors, and ``merged_update`` turns the state into the
merged update ``theta - theta_0``:

- ``task_arithmetic`` (Ilharco et al. 2023): ``lam * sum_k tau_k``; state: the sum.
- ``average``: ``(1/T) sum_k tau_k``, i.e. the mean of the fine-tuned weights; state: the sum.
- ``magmax`` (Marczak et al. 2024): per entry, the ``tau_k`` entry of largest ``|.|`` (the earliest on a tie),
  times ``lam``; state: that entry. Max-magnitude selection is associative, so folding equals the T-way max.
- ``ties`` (Yadav et al. 2023): trim each ``tau_k`` to its top ``density`` fraction by magnitude (``trim``),
  elect the sign of the sum of the trimmed values per entry, average the trimmed values that agree with it
  (a disjoint mean), times ``lam``; state: the sum and count of the positive and of the negative trimmed values,
  from which the elected sign and the disjoint mean follow exactly (peft's ``calculate_majority_sign_mask``
  with ``"total"`` and ``disjoint_merge``: a sign sum of 0 elects +).
- ``dare`` (Yu et al. 2024): drop each entry of ``tau_k`` with probability ``p`` and rescale the kept ones by
  ``1/(1-p)`` (``dare_drop``), then combine with task arithmetic, or with TIES's sign election and disjoint
  mean in place of its trimming (as peft's and mergekit's ``dare_ties``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

METHODS = ("task_arithmetic", "ties", "dare", "magmax", "average")
COMBINE = ("task_arithmetic", "ties")  # what DARE's dropped task vectors are combined with
LINEAR = ("task_arithmetic", "average")  # merges that are a weighted sum of the task vectors
FLOAT_BITS_INF = 0x7F800000  # the int32 bit pattern of +inf: a non-negative float's bits order like its value


def state_size(method: str, combine: str = "task_arithmetic") -> int:
    """Parameter-sized tensors the running state of ``method`` keeps."""
    return 4 if method == "ties" or (method == "dare" and combine == "ties") else 1


def empty_state(like: torch.Tensor, method: str, combine: str, dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.zeros(like.shape, dtype=dtype, device=like.device) for _ in range(state_size(method, combine))]


def fold(state: list[torch.Tensor], tau: torch.Tensor, method: str, combine: str = "task_arithmetic"
         ) -> list[torch.Tensor]:
    """The running state with one more (already trimmed or dropped) task vector ``tau`` folded in (fp32 maths,
    returned in the state's dtype)."""
    dtype, tau = state[0].dtype, tau.float()
    if state_size(method, combine) == 4:  # TIES: sums and counts of the positive and negative values
        pos_sum, pos_n, neg_sum, neg_n = (t.float() for t in state)
        pos, neg = tau > 0, tau < 0
        new = [pos_sum + tau * pos, pos_n + pos, neg_sum + tau * neg, neg_n + neg]
    elif method == "magmax":
        best = state[0].float()
        new = [torch.where(tau.abs() > best.abs(), tau, best)]
    else:
        new = [state[0].float() + tau]
    return [t.to(dtype) for t in new]


def merged_update(state: list[torch.Tensor], method: str, tasks: int, lam: float,
                  combine: str = "task_arithmetic") -> torch.Tensor:
    """``theta_merged - theta_0`` from the running state of ``tasks`` task vectors (fp32)."""
    if state_size(method, combine) == 4:
        pos_sum, pos_n, neg_sum, neg_n = (t.float() for t in state)
        elected = torch.where(pos_sum + neg_sum >= 0, pos_sum / pos_n.clamp(min=1), neg_sum / neg_n.clamp(min=1))
        return lam * elected
    return state[0].float() * (1.0 / tasks if method == "average" else lam)


def trim(tau: torch.Tensor, threshold: float) -> torch.Tensor:
    """TIES's trimming: the entries with ``|tau| >= threshold`` (zero elsewhere)."""
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def dare_drop(tau: torch.Tensor, uniform: torch.Tensor, p: float) -> torch.Tensor:
    """DARE: each entry kept where its uniform draw is ``>= p`` (probability ``1 - p``) and rescaled by
    ``1/(1-p)``, so the expected value is ``tau``."""
    return torch.where(uniform >= p, tau / (1.0 - p), torch.zeros_like(tau))


def kth_largest_magnitude(tensors: Callable[[], Iterable[torch.Tensor]], k: int,
                          reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> float:
    """The ``k``-th largest ``|x|`` over every entry of ``tensors()`` (called once per probe), exactly: a binary
    search on the int32 bit patterns of non-negative float32 values (which order like the values), 31 counting
    passes. ``reduce`` sums a count over processes (FSDP: each process sees its shards), so the threshold is the
    global one at any process count. ``inf`` when ``k`` is 0 (nothing is kept)."""
    if k <= 0:
        return float("inf")
    low, high = 0, FLOAT_BITS_INF  # invariant: count(bits >= low) >= k > count(bits >= high)
    while high - low > 1:
        mid = (low + high) // 2
        count = sum((t.float().abs().view(torch.int32) >= mid).sum() for t in tensors())
        count = reduce(torch.as_tensor(count, dtype=torch.int64).reshape(1))
        low, high = (mid, high) if int(count) >= k else (low, mid)
    return torch.tensor([low], dtype=torch.int32).view(torch.float32).item()


def linear_coefficients(method: str, lam: float, taus: list[list[float]]) -> list[float]:
    """The coefficients over a common basis of the merge of task vectors given as coefficient vectors in it
    (LoRA: one coefficient per adapter; shorter vectors are padded with zeros)."""
    width = max(len(t) for t in taus)
    total = [sum(t[j] for t in taus if j < len(t)) for j in range(width)]
    scale = 1.0 / len(taus) if method == "average" else lam
    return [scale * c for c in total]
