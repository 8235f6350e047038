"""Losses and distributed helpers: hand-checked values, id masks, queue wrap-around, momentum maths."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clsp.ema import ema_update
from clsp.train.distributed import (
    FeatureQueue,
    concat_all_gather,
    cosine_momentum,
    gather_with_grad,
)
from clsp.train.losses import byol_loss, clsp_term, info_nce, moco_infonce, nnclr_loss


def reference_info_nce(z, ids, temperature):
    """Loop version: mean over anchors of the mean over positives of -log(exp(s_ip) / sum_{j != i} exp(s_ij))."""
    z = F.normalize(z, dim=1)
    losses = []
    for i in range(len(z)):
        denom = sum(math.exp(float(z[i] @ z[j]) / temperature) for j in range(len(z)) if j != i)
        pos = [j for j in range(len(z)) if j != i and ids[j] == ids[i]]
        if pos:
            terms = [-math.log(math.exp(float(z[i] @ z[p]) / temperature) / denom) for p in pos]
            losses.append(sum(terms) / len(terms))
    return sum(losses) / len(losses)


def test_info_nce_matches_simclr_nt_xent_for_two_views():
    torch.manual_seed(0)
    z = torch.randn(8, 5)
    ids = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    # SimCLR's NT-Xent as usually written: cross entropy with the other view as the target class, self excluded
    zn = F.normalize(z, dim=1)
    logits = (zn @ zn.T / 0.2).masked_fill(torch.eye(8, dtype=torch.bool), float("-inf"))
    target = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])
    assert info_nce(z, ids, 0.2).item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-5)


def test_info_nce_matches_loop_reference_with_three_views_and_a_lonely_row():
    torch.manual_seed(1)
    z = torch.randn(7, 4)
    ids = torch.tensor([0, 1, 0, 1, 0, 2, 1])  # three views of ids 0 and 1; id 2 has no positive (skipped)
    assert info_nce(z, ids, 0.5).item() == pytest.approx(reference_info_nce(z, ids, 0.5), rel=1e-5)


def test_info_nce_anchor_subset_and_no_positive_error():
    torch.manual_seed(2)
    z, ids = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    full = info_nce(z, ids, 0.3)
    halves = (info_nce(z, ids, 0.3, anchors=slice(0, 3)) + info_nce(z, ids, 0.3, anchors=slice(3, 6))) / 2
    assert halves.item() == pytest.approx(full.item(), rel=1e-5)
    some = torch.tensor([0, 1, 2, 0, 4, 5])  # only rows 0 and 3 have a positive: the others are skipped
    assert info_nce(z, some, 0.3).item() == pytest.approx(info_nce(z, some, 0.3, torch.tensor([0, 3])).item(), rel=1e-6)
    with pytest.raises(RuntimeError, match="no anchor has a positive"):  # checked on the device, without a wait
        info_nce(z, torch.arange(6), 0.3)


def test_moco_byol_nnclr_and_clsp_values():
    torch.manual_seed(3)
    q, k, queue = torch.randn(4, 6), torch.randn(4, 6), F.normalize(torch.randn(10, 6), dim=1)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    expected = sum(
        -math.log(math.exp(float(qn[i] @ kn[i]) / 0.2) / (math.exp(float(qn[i] @ kn[i]) / 0.2)
                  + sum(math.exp(float(qn[i] @ n) / 0.2) for n in queue)))
        for i in range(4)
    ) / 4
    assert moco_infonce(q, k, queue, 0.2).item() == pytest.approx(expected, rel=1e-5)

    assert byol_loss(q, 3.0 * q).item() == pytest.approx(0.0, abs=1e-6)  # scale-invariant
    assert byol_loss(q, -q).item() == pytest.approx(4.0, abs=1e-6)
    assert clsp_term(q, 2.0 * q).item() == pytest.approx(0.0, abs=1e-6)
    assert clsp_term(q, -q).item() == pytest.approx(4.0, abs=1e-6)
    assert clsp_term(q, k).item() == pytest.approx((2 - 2 * F.cosine_similarity(q, k)).mean().item(), rel=1e-5)

    p = torch.randn(8, 6)  # e.g. gathered from two ranks; our rows are 4..7
    logits = F.normalize(q, dim=1) @ F.normalize(p, dim=1).T / 0.1
    assert nnclr_loss(q, p, 0.1, first_label=4).item() == pytest.approx(
        F.cross_entropy(logits, torch.arange(4, 8)).item(), rel=1e-5
    )
    ids = torch.tensor([0, 1, 2, 1])  # rows 1 and 3: one anchor twice (its other row is no negative)
    p_ids = torch.tensor([5, 1, 6, 7, 0, 1, 2, 1])  # gathered: rows 4..7 ours, row 1 another rank's copy of anchor 1
    by_hand = torch.stack([
        F.cross_entropy(logits[i, keep][None], torch.tensor([keep.index(4 + i)]))
        for i, keep in enumerate([list(range(8)), [0, 2, 3, 4, 5, 6], list(range(8)), [0, 2, 3, 4, 6, 7]])]).mean()
    assert nnclr_loss(q, p, 0.1, 4, ids, p_ids).item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert nnclr_loss(q, p, 0.1, 4, torch.arange(4, 8), torch.arange(8)).item() == pytest.approx(  # no twins: as before
        F.cross_entropy(logits, torch.arange(4, 8)).item(), rel=1e-5)


def test_feature_queue_wraps_around_and_round_trips_state():
    queue = FeatureQueue(size=5, dim=2)
    assert queue.get().shape == (0, 2)
    rows = torch.arange(16, dtype=torch.float32).view(8, 2)  # row r = (2r, 2r + 1)
    queue.enqueue(rows[:3])
    assert torch.equal(queue.get(), rows[:3]) and int(queue.ptr) == 3
    queue.enqueue(rows[3:7])  # rows 3, 4 fill slots 3, 4; rows 5, 6 wrap to slots 0, 1
    assert int(queue.filled) == 5 and int(queue.ptr) == 2
    assert torch.equal(queue.get(), torch.stack([rows[5], rows[6], rows[2], rows[3], rows[4]]))
    many = torch.arange(100, 114, dtype=torch.float32).view(7, 2)  # more rows than slots: newest 5 survive
    queue.enqueue(many)
    assert int(queue.ptr) == (2 + 7) % 5
    assert sorted(queue.get()[:, 0].tolist()) == many[2:, 0].tolist()
    restored = FeatureQueue(size=5, dim=2)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.get(), queue.get()) and int(restored.ptr) == int(queue.ptr)
    with pytest.raises(ValueError, match="expects"):
        queue.enqueue(torch.zeros(3, 4))


def test_momentum_update_and_cosine_schedule():
    torch.manual_seed(4)
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.detach().clone() for p in target.parameters()]
    ema_update(target, online, 0.9, lerp=False)
    for t0, o, t in zip(before, online.parameters(), target.parameters()):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * o)
    ema_update(target, online, 0.0, lerp=False)
    assert all(torch.equal(t, o) for o, t in zip(online.parameters(), target.parameters()))
    assert cosine_momentum(0.99, 0.999, 0.0) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 0.999, 0.5) == pytest.approx(0.9945)
    assert cosine_momentum(0.99, 1.0, 1.0) == pytest.approx(1.0)


def test_gathers_are_identity_in_one_process():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    assert torch.equal(concat_all_gather(x), x)
