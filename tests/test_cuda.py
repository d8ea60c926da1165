"""The CUDA path, on a machine with a GPU (skipped where torch sees none, as on CI here).

    pytest tests/test_cuda.py -q      # on a GPU machine

Same code as on CPU, so the checks compare against a CPU run of the same thing:
book-keeping clipping, a DP site round (every grad-sample mode), few-shot
adaptation, and a whole Flower simulation that gives each site a share of the GPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import fedmeta
from torch import nn

from fedmeta.config import RunConfig, build_task
from fedmeta.data.tasks.base import Pool
from fedmeta.meta.adaptation import meta_evaluate
from fedmeta.meta.models import SmallCNN
from fedmeta.paths import RunPaths
from fedmeta.privacy.bookkeeping import BookKeepingClipper
from fedmeta.privacy.dp_training import DPSettings, train_steps
from fedmeta.simulation import backend_config
from fedmeta.site import Site
from policies import example_run_declaration

GPU = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 would make GPU results differ from CPU by ~1e-3; compare in true float32."""
    matmul, conv = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = conv


def digits_pool(n: int = 60) -> Pool:
    rng = np.random.default_rng(0)
    return Pool(rng.random((n, 1, 8, 8), dtype=np.float32), rng.integers(0, 5, n))


def test_bookkeeping_clipped_sum_on_cuda_equals_cpu():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)
    grads = []
    for device in ("cpu", GPU):
        torch.manual_seed(1)
        model = SmallCNN(5).to(device)
        clipper = BookKeepingClipper(model, 0.5)
        clipper.backward(nn.CrossEntropyLoss()(model(x.to(device)), y.to(device)) * len(x))
        clipper.close()
        grads.append([p.grad.detach().cpu() for p in model.parameters()])
        assert all(p.grad.device.type == device for p in model.parameters())
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["bk", "ew", "hooks", "auto"])
def test_dp_training_runs_on_cuda(mode):
    torch.manual_seed(0)
    model = SmallCNN(5)
    before = [p.detach().clone() for p in model.parameters()]
    res = train_steps(
        model,
        digits_pool(),
        loss_fn=nn.CrossEntropyLoss(),
        steps=4,
        lr=0.1,
        batch_size=10,
        dp=DPSettings(1.0, 1.0, grad_sample_mode=mode),
        device=GPU,
        seed=0,
    )
    params = list(model.parameters())
    assert all(p.device.type == GPU and torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p.detach().cpu(), b) for p, b in zip(params, before, strict=True))
    assert res.dp_step == (1.0, 10 / 60, 4)


def test_a_site_round_on_cuda_matches_cpu(tmp_path):
    """One DP site round: same ledger charge on both devices, and a state returned on CPU."""
    replies = []
    for i, device in enumerate(("cpu", GPU)):
        cfg = RunConfig(sites=3, inner_steps=3, n_way=5, device=device)
        theta = build_task(cfg).build_model(5).state_dict()
        site = Site("site-0", 0, tmp_path / str(i), cfg)
        replies.append(site.train_round(theta, "run-1", 1, example_run_declaration()))
    cpu, gpu = replies
    assert not gpu.declined and gpu.epsilon_total == pytest.approx(cpu.epsilon_total)
    assert all(v.device.type == "cpu" and torch.isfinite(v).all() for v in gpu.state.values())
    assert gpu.num_examples == cpu.num_examples


def test_adaptation_on_cuda_matches_cpu():
    task = build_task(RunConfig())
    torch.manual_seed(0)
    state = task.build_model(5).state_dict()
    scores = [
        meta_evaluate(
            task,
            state,
            5,
            split="val",
            episodes=10,
            shots=5,
            query=5,
            steps=5,
            lr=0.3,
            seed=3,
            device=device,
        ).adapted
        for device in ("cpu", GPU)
    ]
    assert scores[1] == pytest.approx(scores[0], abs=0.02)


def test_simulation_gives_each_site_a_share_of_the_gpu(tmp_path):
    resources = backend_config(RunConfig(sites=4, device=GPU))
    share = resources["client_resources"]["num_gpus"]
    assert 0 < share <= 1 and resources["init_args"]["num_gpus"] == torch.cuda.device_count()
    out = tmp_path / "run"
    res = fedmeta(
        "simulate",
        "--task",
        "digits-fewshot",
        "--sites",
        "4",
        "--rounds",
        "2",
        "--device",
        GPU,
        "--set",
        "eval-episodes=5",
        "--out",
        str(out),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(RunPaths(out).config.read_text())["device"] == GPU
    lines = [json.loads(x) for x in RunPaths(out).metrics.read_text().splitlines()]
    rounds = [line for line in lines if line["round"] > 0]
    assert len(rounds) == 2
    for line in rounds:  # every sampled site trained under DP; none declined or dropped
        assert line["used"] == line["sampled"] and not line["declined"] and not line["dropped"]
        assert all(line["dp"].values()) and all(e > 0 for e in line["epsilon"].values())
