"""iupo_loss against an independent, per-sample transcription of the paper's Eq. 17/19, and the
reference update rule."""

import math

import pytest
import torch

from trainer.objective import ReferenceUpdater, iupo_loss


def paper_loss(pred, ref, win, lose, lam):
    """Eq. 17/19 written sample by sample with python floats: ||.||² is the mean over tokens and
    channels, ℓ(a) = log(1 + exp(-a)) applied to a = -[2(...) - (...) - ||f_ref - f||²]."""
    base_terms, pref_terms = [], []
    for f, f_ref, c_w, c_l in zip(pred.tolist(), ref.tolist(), win.tolist(), lose.tolist()):
        def sq(x, y):
            flat = [(xi - yi) ** 2 for row_x, row_y in zip(x, y) for xi, yi in zip(row_x, row_y)]
            return sum(flat) / len(flat)

        inner = 2 * (sq(c_w, f) - sq(c_w, f_ref)) - (sq(c_l, f) - sq(c_l, f_ref)) - sq(f_ref, f)
        a = -inner
        base_terms.append(sq(c_w, f))
        pref_terms.append(math.log(1 + math.exp(-a)))
    base = sum(base_terms) / len(base_terms)
    pref = sum(pref_terms) / len(pref_terms)
    return base + lam * pref, base, pref


def random_batch(seed, batch=4, tokens=3, dim=5):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, tokens, dim, generator=generator, dtype=torch.float64) for _ in range(4)]


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_iupo_loss_matches_paper_formula(lam, seed):
    pred, ref, win, lose = random_batch(seed)
    loss, stats = iupo_loss(pred, ref, win, lose, lam=lam)
    expected, base, pref = paper_loss(pred, ref, win, lose, lam)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["base"].item() == pytest.approx(base, rel=1e-5)
    assert stats["pref"].item() == pytest.approx(pref, rel=1e-5)


def test_hand_computed_value():
    # One sample, one token, one channel: c_w = 1, c_l = 0, f = 0.5, f_ref = 0.
    # d(c_w,f)=0.25, d(c_w,f_ref)=1, d(c_l,f)=0.25, d(c_l,f_ref)=0, d(f_ref,f)=0.25
    # X = 2(0.25-1) - (0.25-0) - 0.25 = -2 ; L_pref = log(1+e^-2) ; L_base = 0.25
    t = lambda v: torch.tensor([[[v]]])  # noqa: E731
    loss, stats = iupo_loss(t(0.5), t(0.0), t(1.0), t(0.0), lam=1.0)
    assert stats["base"].item() == pytest.approx(0.25)
    assert stats["pref"].item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    assert loss.item() == pytest.approx(0.25 + math.log(1 + math.exp(-2)), rel=1e-6)
    assert stats["win_rate"].item() == 1.0


def test_sum_reduction_scales_with_elements():
    pred, ref, win, lose = random_batch(3, tokens=2, dim=3)
    _, mean_stats = iupo_loss(pred, ref, win, lose, reduction="mean")
    _, sum_stats = iupo_loss(pred, ref, win, lose, reduction="sum")
    assert sum_stats["base"].item() == pytest.approx(6 * mean_stats["base"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        iupo_loss(pred, ref, win, lose, reduction="max")


def test_reference_output_gets_no_gradient_and_pred_does():
    pred, ref, win, lose = random_batch(4)
    pred.requires_grad_(True)
    ref.requires_grad_(True)
    loss, _ = iupo_loss(pred, ref, win, lose)
    loss.backward()
    assert ref.grad is None
    assert pred.grad is not None and pred.grad.abs().sum().item() > 0


def test_shape_mismatch_is_an_error():
    pred, ref, win, lose = random_batch(5)
    with pytest.raises(ValueError, match="one shape"):
        iupo_loss(pred, ref[:, :2], win, lose)


def test_reference_update_fires_after_exactly_k_consecutive_wins():
    updater = ReferenceUpdater(k=3)
    fired = [updater.step(closer) for closer in [True, True, True, True, True, True]]
    assert fired == [False, False, True, False, False, True]
    assert updater.updates == 2 and updater.consecutive_wins == 0


def test_reference_update_counter_resets_on_a_loss():
    updater = ReferenceUpdater(k=3)
    fired = [updater.step(closer) for closer in [True, True, False, True, True, True]]
    assert fired == [False, False, False, False, False, True]
    assert updater.updates == 1


def test_reference_updater_state_round_trip():
    updater = ReferenceUpdater(k=10)
    for closer in [True] * 13 + [False] + [True] * 4:
        updater.step(closer)
    restored = ReferenceUpdater(k=10)
    restored.load_state_dict(updater.state_dict())
    assert restored.state_dict() == {"k": 10, "consecutive_wins": 4, "updates": 1}
    fired = [restored.step(True) for _ in range(6)]
    assert fired == [False] * 5 + [True]
    with pytest.raises(ValueError, match="k=10"):
        ReferenceUpdater(k=5).load_state_dict(updater.state_dict())
    with pytest.raises(ValueError, match="k must be"):
        ReferenceUpdater(k=0)
