"""Backbones and methods: shapes, loss decreases over SGD steps, CLSP wiring, momentum targets, config validation."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import host_traffic

from clsp.train.backbones import build_backbone, mlp_head, wants_small_stem
from clsp.train.distributed import FeatureQueue
from clsp.train.losses import moco_infonce
from clsp.train.methods import MethodConfig, build_method, method_names, setting_names
from clsp.train.methods.byol import BYOLConfig
from clsp.train.methods.moco import MoCoConfig

METHODS = tuple(method_names())  # every registered method: one added later gets these tests too
assert {"simclr", "moco", "nnclr", "byol"} <= set(METHODS)
TINY = {"proj_hidden": 32, "proj_dim": 16, "pred_hidden": 32, "queue_size": 16}  # each method takes those it has


def tiny_method(name, positives="none", **overrides):
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18", width=4)
    tiny = {key: value for key, value in TINY.items() if key in setting_names(name)}
    cfg = MethodConfig.for_method(name, positives=positives, **{**tiny, **overrides})
    return build_method(name, backbone, dim, cfg)


def fixed_batch(b=8, size=8):
    g = torch.Generator().manual_seed(1)
    v1, v2, v3 = torch.randn(3, b, 3, size, size, generator=g).unbind(0)
    return v1, v2, v3, torch.arange(b)


TORCHVISION_RESNETS = Path(__file__).parent / "data" / "torchvision_resnets.json"  # made once with torchvision


def fill_weights(state: dict) -> dict:
    """Fixed, version-independent values for every entry of a ResNet state dict (the fixture's weights)."""
    rng = np.random.default_rng(0)
    filled = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            filled[key] = value
        elif key.endswith("running_var"):
            filled[key] = torch.from_numpy(0.5 + rng.random(value.shape, dtype=np.float32))
        else:  # conv/bn weights, biases, running means: small normal values keep 50 layers finite
            filled[key] = torch.from_numpy(0.1 * rng.standard_normal(value.shape, dtype=np.float32))
    return filled


def reference_input() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, 64, 64), dtype=np.float32))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_backbone_is_torchvisions_resnet(name):
    # torchvision's own ResNet (ImageNet stem, fc removed) under fixed weights, recorded in tests/data: the same state
    # dict names and shapes, and the same features, so torchvision checkpoints load into ours
    reference = json.loads(TORCHVISION_RESNETS.read_text())["models"][name]
    net, dim = build_backbone(name, width=64, small_stem=False)
    assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == reference["state"]
    net.load_state_dict(fill_weights(net.state_dict()))
    with torch.no_grad():
        features = net.eval()(reference_input())  # (2, D)
    expected = torch.tensor(reference["features"])
    assert dim == expected.shape[1] == (512 if name == "resnet18" else 2048)
    assert torch.allclose(features, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_backbone_width_scales_every_stage():
    net, _ = build_backbone("resnet18", width=64, small_stem=False)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    small, small_dim = build_backbone("resnet18", width=16)
    assert small_dim == 128
    assert 12 < count(net) / count(small) < 20  # ~4x fewer channels everywhere -> ~16x fewer weights
    deep, deep_dim = build_backbone("resnet50", width=8)
    assert deep_dim == 8 * 8 * 4
    assert deep(torch.randn(2, 3, 16, 16)).shape == (2, 256)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, torch.nn.Identity)
    assert wants_small_stem(32) and not wants_small_stem(224)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vit_b16")


def test_mlp_head_layout():
    with_bn, without_bn = mlp_head(8, 16, 4, True), mlp_head(8, 16, 4, False)
    assert [type(m).__name__ for m in with_bn] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [type(m).__name__ for m in without_bn] == ["Linear", "ReLU", "Linear"]
    assert with_bn(torch.randn(3, 8)).shape == (3, 4)


@pytest.mark.parametrize("positives", ["none", "synthetic"])
@pytest.mark.parametrize("name", METHODS)
def test_loss_decreases_over_sgd_steps(name, positives):
    method = tiny_method(name, positives)
    v1, v2, v3, ids = fixed_batch()
    third = None if positives == "none" else v3
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    for step in range(8):
        out = method([v1, v2], ids, third)
        assert set(out) == {"loss", "loss_base", "loss_clsp"} and torch.isfinite(out["loss"])
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        method.after_step(step / 8)
        losses.append(out["loss"].item())
    # MoCo's first loss sees an empty queue (and keys equal to queries), so compare from step 1
    assert losses[-1] < losses[1] and losses[-1] < max(losses[:2])
    if positives == "none":
        assert out["loss_clsp"].item() == 0.0
    else:
        assert out["loss_clsp"].item() > 0


@pytest.mark.parametrize("positives", ["none", "synthetic"])
@pytest.mark.parametrize("name", METHODS)
def test_a_training_step_never_waits_for_the_device(name, positives):
    """Forward, backward, SGD step and after_step, on the meta device under a watch for host reads of device values
    (queue lengths, positive checks, boolean masks) and copies onto the device: there are none, so on a GPU the host
    queues a whole step ahead (the loop's one wait is its loss copy after the update: train.epoch)."""
    method = tiny_method(name, positives).to("meta").train()
    v1, v2, v3, ids = (t.to("meta") for t in fixed_batch())
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.05, momentum=0.9,
                                weight_decay=1e-4)
    with host_traffic() as seen:
        for step in range(2):  # the second with filled queues (MoCo, NNCLR) and momentum buffers
            method([v1, v2], ids, None if positives == "none" else v3)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            method.after_step(step / 2)
    assert seen == []


@pytest.mark.parametrize("name", METHODS)
def test_clsp_term_weighting_and_third_view_is_no_negative(name):
    method = tiny_method(name, "synthetic", lam=0.7)
    method.eval()  # no queue writes, BN frozen: forwards are comparable
    v1, v2, v3, ids = fixed_batch()
    out = method([v1, v2], ids, v3)
    assert out["loss"].item() == pytest.approx(out["loss_base"].item() + 0.7 * out["loss_clsp"].item(), rel=1e-6)
    other = method([v1, v2], ids, torch.randn_like(v3))
    assert other["loss_base"].item() == pytest.approx(out["loss_base"].item(), rel=1e-6)  # third view not a negative
    assert other["loss_clsp"].item() != pytest.approx(out["loss_clsp"].item())
    assert method([v1, v2], ids, v1)["loss_clsp"].item() == pytest.approx(0.0, abs=1e-6)  # z3 == z1


def test_third_view_rules_and_input_checks():
    v1, v2, v3, ids = fixed_batch()
    with pytest.raises(ValueError, match="takes no third view"):
        tiny_method("simclr", "none")([v1, v2], ids, v3)
    with pytest.raises(ValueError, match="needs the third view"):
        tiny_method("simclr", "augment")([v1, v2], ids, None)
    with pytest.raises(ValueError, match="two augmented real views"):
        tiny_method("simclr", "none")([v1], ids)
    with pytest.raises(ValueError, match="ids must have shape"):
        tiny_method("simclr", "none")([v1, v2], ids[:4])


@pytest.mark.parametrize("name", ["moco", "byol"])
def test_after_step_moves_target_by_the_scheduled_momentum(name):
    method = tiny_method(name, "none")
    v1, v2, _, ids = fixed_batch()
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    method([v1, v2], ids)["loss"].backward()
    optimizer.step()
    target_before = [p.clone() for p in method.target_backbone.parameters()]
    method.after_step(0.0)  # momentum_base = 0.99
    for t0, o, t in zip(target_before, method.backbone.parameters(), method.target_backbone.parameters()):
        assert not t.requires_grad
        assert torch.allclose(t, 0.99 * t0 + 0.01 * o, atol=1e-6)
    if name == "byol":  # BYOL ends at momentum 1.0: the target freezes
        frozen = [p.clone() for p in method.target_backbone.parameters()]
        method.after_step(1.0)
        assert all(torch.equal(a, b) for a, b in zip(frozen, method.target_backbone.parameters()))


def test_queue_state_is_in_the_state_dict_and_only_fills_in_training():
    method = tiny_method("moco", "none")
    v1, v2, _, ids = fixed_batch()
    method.eval()
    method([v1, v2], ids)
    assert [int(queue.filled) for queue in method.queues] == [0, 0]
    method.train()
    method([v1, v2], ids)
    assert [int(queue.filled) for queue in method.queues] == [len(ids), len(ids)]  # one key per image and view
    clone = tiny_method("moco", "none")
    clone.load_state_dict(method.state_dict())
    assert all(torch.equal(a.get(), b.get()) for a, b in zip(clone.queues, method.queues))
    assert {"queues.0.features", "queues.1.features"} <= set(method.state_dict())


def test_moco_scores_each_query_against_the_other_views_past_keys():
    method = tiny_method("moco", "none").train()
    v1, v2, _, ids = fixed_batch()
    method([v1, v2], ids)  # fills each view's queue with its keys
    k1, k2 = method.keys(v1), method.keys(v2)  # (B, p): the same batch, so the same keys as those just queued
    past_k1, past_k2 = (queue.get() for queue in method.queues)
    assert torch.allclose(past_k1, k1, atol=1e-6) and torch.allclose(past_k2, k2, atol=1e-6)
    w1, w2 = v1.flip(-1), v2.flip(-2)  # a new batch: its loss uses the queues as they were before it
    t = method.cfg.temperature
    q1, q2, n1, n2 = method.project(w1), method.project(w2), method.keys(w1), method.keys(w2)
    expected = (moco_infonce(q1, n2, past_k2, t) + moco_infonce(q2, n1, past_k1, t)) / 2
    assert torch.allclose(method([w1, w2], ids)["loss_base"], expected, atol=1e-5)


def test_each_method_has_its_own_settings_and_defaults():
    simclr = MethodConfig.for_method("simclr")
    assert (simclr.lam, simclr.temperature) == (1.0, 0.2) and not hasattr(simclr, "queue_size")
    moco = MethodConfig.for_method("moco", temperature=None)  # None keeps the default
    assert isinstance(moco, MoCoConfig)
    assert (moco.lam, moco.queue_size, moco.momentum_base, moco.momentum_final) == (0.5, 32768, 0.99, 0.999)
    byol = MethodConfig.for_method("byol")
    assert isinstance(byol, BYOLConfig) and (byol.momentum_base, byol.momentum_final) == (0.99, 1.0)
    assert "temperature" not in setting_names("byol") and "pred_hidden" not in setting_names("moco")
    with pytest.raises(ValueError, match="byol has no setting temperature: its settings are"):
        MethodConfig.for_method("byol", temperature=0.1)
    with pytest.raises(ValueError, match="simclr has no setting queue_size, tau"):
        MethodConfig.for_method("simclr", tau=0.1, queue_size=8)


def test_config_validation():
    backbone, dim = build_backbone("resnet18", width=4)
    with pytest.raises(ValueError, match="unknown method 'swav'"):
        build_method("swav", backbone, dim, MethodConfig())
    with pytest.raises(ValueError, match="unknown method"):
        MethodConfig.for_method("swav")
    with pytest.raises(ValueError, match="positives must be one of"):
        MethodConfig(positives="real")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        MethodConfig.for_method("simclr", temperature=0.0)
    with pytest.raises(ValueError, match="lam"):
        MethodConfig(lam=-1.0)
    with pytest.raises(ValueError, match="pred_hidden must be a positive layer width"):
        BYOLConfig(pred_hidden=0)
    with pytest.raises(ValueError, match="momentum"):
        MoCoConfig(momentum_base=0.999, momentum_final=0.99)
    with pytest.raises(ValueError, match="queue_size must be >= 1"):
        MoCoConfig(queue_size=0)
    with pytest.raises(TypeError, match="moco takes settings of type MoCoConfig"):
        build_method("moco", backbone, dim, MethodConfig.for_method("simclr"))  # SimCLR's settings have no queue
    with pytest.raises(TypeError, match="simclr takes settings of type InfoNCEConfig"):
        build_method("simclr", backbone, dim, {"lam": 1.0})
    with pytest.raises(TypeError, match="got MoCoConfig"):  # MoCo's settings are InfoNCE ones too, not SimCLR's
        build_method("simclr", backbone, dim, MethodConfig.for_method("moco"))
    assert build_method("simclr", backbone, dim).backbone is backbone  # the encoder evaluated downstream


def _two_rank_method_worker(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # two processes share the cores
    v1, v2, _, ids = fixed_batch(b=8)
    methods, expected = {}, {}
    for name in ("simclr", "nnclr"):  # reference first, in one process with the whole batch
        methods[name] = method = tiny_method(name, "none").eval()  # eval BN: features ignore the batch
        single = method([v1, v2], ids)["loss"]
        params = [p for p in method.parameters() if p.requires_grad]
        expected[name] = (single.item(), torch.autograd.grad(single, params))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = slice(rank * 4, (rank + 1) * 4)
        for name, method in methods.items():
            params = [p for p in method.parameters() if p.requires_grad]
            local = method([v1[rows], v2[rows]], ids[rows])["loss"]  # negatives come from both ranks
            grads = torch.autograd.grad(local, params)
            for g in grads:  # what DDP does: average over ranks
                dist.all_reduce(g)
                g /= world
            mean_loss = local.detach().clone()
            dist.all_reduce(mean_loss)
            single_loss, single_grads = expected[name]
            assert mean_loss.item() / world == pytest.approx(single_loss, rel=1e-5), name
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, single_grads)), name
        queue = FeatureQueue(size=6, dim=2)  # enqueue gathers: 8 rows in rank order, rows 6, 7 wrap to slots 0, 1
        queue.enqueue(torch.arange(8.0).repeat(2, 1).T[rows])
        assert queue.get()[:, 0].tolist() == [6.0, 7.0, 2.0, 3.0, 4.0, 5.0] and int(queue.ptr) == 2
    finally:
        dist.destroy_process_group()


def test_two_process_gathers_match_one_process_on_the_whole_batch(tmp_path):
    # SimCLR negatives and NNCLR predictions gathered across ranks (gloo), and the queue filled from both ranks
    import torch.multiprocessing as mp

    # fork: the children reuse the imported modules instead of importing torch again. Not on a machine with a GPU:
    # there autograd's per-device threads, started by any earlier backward pass, do not survive a fork.
    start = "spawn" if torch.cuda.is_available() else "fork"
    mp.start_processes(_two_rank_method_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, start_method=start)
