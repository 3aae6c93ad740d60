"""The Iteratively Updated Preference Objective (IUPO) of IMG (paper Sec. 3.4 and Supp. B, REFERENCE §6).

Notation (all feature tensors are IP-Adapter image tokens, shape (B, Si, D)):

    c_w    = image features of the winning image        (the target)
    c_l    = image features of the losing image         (the aligner's input)
    f      = f(c_l, guidance), the trained aligner's output
    f_ref  = f_ref(c_l, guidance), the reference aligner's output (no gradient)

    d(a, b) = ||a - b||²,  taken per sample as the MEAN over all non-batch dimensions (tokens and
              channels), so the loss scale does not depend on Si or D. `reduction="sum"` takes the
              sum instead (the paper does not say which one it used).

    L_base = mean_B  d(c_w, f)
    X      = 2·[d(c_w, f) - d(c_w, f_ref)] - [d(c_l, f) - d(c_l, f_ref)] - d(f_ref, f)
    L_pref = mean_B  ℓ(-X),  ℓ(a) = log(1 + exp(-a)) = -log σ(a), so ℓ(-X) = softplus(X)
    L      = L_base + λ·L_pref

These are the paper's Eq. 17 (L_pref) and Eq. 19 (L), numbering as cited in issue 4. The reference
aligner starts as the initial aligner (a fresh aligner is the identity, so its outputs equal those of
the paper's "fresh initialisation") and is replaced by a copy of the trained aligner after f was closer
to c_w than f_ref for k consecutive iterations (`ReferenceUpdater`).

What the objective converges to: the quadratic terms of X cancel (2 - 1 - 1 = 0), so X is linear in f,
∂X/∂f = (2c_l + 2f_ref - 4c_w)/n, and L_pref alone has no minimum. Setting ∂L/∂f = 0 gives, per sample,
f = c_w + λ·σ(X)·(2c_w - c_l - f_ref): with λ > 0 the optimum lies beyond the winner, away from the
loser (with f_ref ≈ f: f = c_w + λσ/(1 + λσ)·(c_w - c_l)). The held-out MSE to c_w therefore levels off
above zero (about a quarter of the identity baseline's on the synthetic test store), while λ = 0 is
plain regression onto c_w.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum")


def squared_distance(a: torch.Tensor, b: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """||a - b||² per sample: (B, ...) x (B, ...) -> (B,), mean (default) or sum over non-batch dims."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    diff = (a.float() - b.float()).pow(2).flatten(1)  # (B, Si*D)
    return diff.mean(dim=1) if reduction == "mean" else diff.sum(dim=1)


def iupo_loss(
    pred: torch.Tensor,
    ref: torch.Tensor,
    win: torch.Tensor,
    lose: torch.Tensor,
    lam: float = 1.0,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IUPO loss L = L_base + lam * L_pref (paper Eq. 17 and 19; see the module docstring).

    Args:
        pred: (B, Si, D) output of the trained aligner f on the losing image's features; carries grad.
        ref:  (B, Si, D) output of the reference aligner f_ref on the same input; detached here.
        win:  (B, Si, D) features of the winning image c_w.
        lose: (B, Si, D) features of the losing image c_l (the aligner's input).
        lam:  weight λ of the preference term (paper: 1; 0 gives plain regression).
        reduction: "mean" (default) or "sum" of the squared error over the non-batch dimensions.

    Returns:
        loss: scalar float32 tensor (mean over the batch).
        stats: detached float32 scalars — `base` (L_base), `pref` (L_pref), `dist_pred` (mean d(c_w, f)),
            `dist_ref` (mean d(c_w, f_ref)), `win_rate` (fraction of samples with d(c_w, f) < d(c_w, f_ref)).
    """
    if not (pred.shape == ref.shape == win.shape == lose.shape):
        raise ValueError(
            f"pred, ref, win and lose must have one shape, got {tuple(pred.shape)}, {tuple(ref.shape)}, "
            f"{tuple(win.shape)}, {tuple(lose.shape)}"
        )
    ref = ref.detach()
    dist_win = squared_distance(win, pred, reduction)  # (B,) d(c_w, f)
    dist_win_ref = squared_distance(win, ref, reduction)  # (B,) d(c_w, f_ref)
    dist_lose = squared_distance(lose, pred, reduction)  # (B,) d(c_l, f)
    dist_lose_ref = squared_distance(lose, ref, reduction)  # (B,) d(c_l, f_ref)
    dist_ref = squared_distance(ref, pred, reduction)  # (B,) d(f_ref, f)

    margin = 2 * (dist_win - dist_win_ref) - (dist_lose - dist_lose_ref) - dist_ref  # (B,) X
    base = dist_win.mean()
    pref = F.softplus(margin).mean()  # ℓ(-X) = log(1 + exp(X)), computed stably
    loss = base + lam * pref
    stats = {
        "base": base.detach(),
        "pref": pref.detach(),
        "dist_pred": dist_win.detach().mean(),
        "dist_ref": dist_win_ref.mean(),
        "win_rate": (dist_win.detach() < dist_win_ref).float().mean(),
    }
    return loss, stats


@dataclass
class ReferenceUpdater:
    """Decides when the reference aligner becomes a copy of the trained one (paper Sec. 3.4).

    Call `step(closer)` once per optimizer step with `closer = d(c_w, f) < d(c_w, f_ref)` for that step
    (batch means, identical on every process). It returns True on the k-th consecutive True, and then
    the caller copies f into f_ref; the counter restarts from 0 after an update and after any False.
    """

    k: int = 10
    consecutive_wins: int = 0
    updates: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")

    def step(self, closer: bool) -> bool:
        self.consecutive_wins = self.consecutive_wins + 1 if closer else 0
        if self.consecutive_wins < self.k:
            return False
        self.consecutive_wins = 0
        self.updates += 1
        return True

    def state_dict(self) -> dict[str, int]:
        return {"k": self.k, "consecutive_wins": self.consecutive_wins, "updates": self.updates}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["k"] != self.k:
            raise ValueError(f"checkpoint was trained with k={state['k']}, this run has k={self.k}")
        self.consecutive_wins = int(state["consecutive_wins"])
        self.updates = int(state["updates"])
