"""The one EMA update and the one warm-up-cosine schedule give the floats their former copies gave, to the bit."""
import math

import torch
from torch import nn

from clsp.ema import ema_update
from clsp.schedules import warmup_cosine


def test_ema_update_keeps_each_users_arithmetic_to_the_bit():
    torch.manual_seed(0)
    online = nn.Linear(40, 30)
    for keep in (0.1, 0.5, 0.9, 0.99, 0.9999):
        start = [p.detach().clone() for p in nn.Linear(40, 30).parameters()]
        lerped = [t.clone().lerp_(o.detach(), 1 - keep) for t, o in zip(start, online.parameters())]  # diffusion EMA
        mul_add = [t.clone() for t in start]  # MoCo/BYOL's former momentum_update
        torch._foreach_mul_(mul_add, keep)
        torch._foreach_add_(mul_add, [o.detach() for o in online.parameters()], alpha=1.0 - keep)
        for lerp, expected in ((True, lerped), (False, mul_add)):
            target = nn.Linear(40, 30)
            with torch.no_grad():
                for t, s in zip(target.parameters(), start):
                    t.copy_(s)
            ema_update(target, online, keep, lerp=lerp)
            assert all(torch.equal(t, e) for t, e in zip(target.parameters(), expected)), (keep, lerp)


def test_warmup_cosine_is_the_generator_lr_the_shipped_weights_were_trained_with():
    def former(step, warmup, total, lr):  # synth/diffusion_train.py's lr_at (cosine) before it became warmup_cosine
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * progress))

    # bit-exact: `make generator` must retrain the shipped generator's weights on the machine its card names
    assert all(warmup_cosine(s, w, n, peak=lr) == former(s, w, n, lr)
               for lr in (1.0, 2e-3, 0.3) for w in (1, 7, 100) for n in (10, 333, 4000) for s in range(n))
    assert warmup_cosine(0, 4, 10, peak=2.0) == 0.5 and warmup_cosine(10, 4, 10, peak=2.0) == 0.0


def test_loader_processes_get_cores_of_their_own(monkeypatch):
    """Issue 13 (3): on the CPU the model's threads are the cores the loader processes leave free, unless the user
    chose a count; oversubscribed OpenMP threads spin and a step takes many times as long."""
    import clsp.accelerator as accelerator

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(accelerator, "available_cores", lambda: 8)
    monkeypatch.setattr(accelerator, "_TORCH_DEFAULT_THREADS", before)  # nobody has chosen a count yet
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two training processes on this machine (torchrun sets it)
        monkeypatch.setenv("WORLD_SIZE", "16")  # of 16 over all machines: not this machine's to share
        assert accelerator.threads_beside_workers(2) == 2 and torch.get_num_threads() == 2
        monkeypatch.delenv("LOCAL_WORLD_SIZE")  # no launcher: this process alone
        monkeypatch.setattr(accelerator, "_TORCH_DEFAULT_THREADS", 2)
        assert accelerator.threads_beside_workers(2) == 6 and torch.get_num_threads() == 6
        monkeypatch.setattr(accelerator, "_TORCH_DEFAULT_THREADS", 6)
        assert accelerator.threads_beside_workers(8) == 1  # never below one thread
        torch.set_num_threads(3)  # the user's choice stands
        assert accelerator.threads_beside_workers(2) is None and torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        monkeypatch.setattr(accelerator, "_TORCH_DEFAULT_THREADS", 3)
        assert accelerator.threads_beside_workers(2) is None and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
