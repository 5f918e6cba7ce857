"""What only a CUDA device can check: the experts' batched matmuls chosen by themselves on
CUDA, bf16 kernels against fp32 on CPU, and training through the launcher on GPU ranks
(NCCL). Skipped without a CUDA device (CI); `bash benchmarks/run_gpu.sh` runs them.
"""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from test_dispatch import make_layer, make_tokens, reference_forward

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def outputs_and_grads(run, layer, x, modality):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = run(layer, x, modality)
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device, y.dtype)
    (y * cotangent).sum().backward()
    return y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


def test_experts_choose_batched_matmuls_on_cuda_and_match_the_per_token_loop(monkeypatch):
    from limoe.layers import MLP

    calls = []
    grouped = MLP.grouped_forward
    monkeypatch.setattr(MLP, "grouped_forward", staticmethod(lambda experts, x: calls.append(1) or grouped(experts, x)))
    layer = make_layer(capacity_factor=0.5).cuda().train()  # batched=None: the device decides
    x, modality = (t.cuda() for t in make_tokens())
    y, gx, grads = outputs_and_grads(lambda m, a, b: m(a, b)[0], layer, x, modality)
    assert calls, "on CUDA the experts should run as batched matmuls"
    y_ref, gx_ref, grads_ref = outputs_and_grads(lambda m, a, b: reference_forward(m, a, b)[0], layer, x, modality)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_on_cuda_embeds_like_fp32_on_cpu(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    tokens = tiny_tokenizer(["a red circle", "green", "blue square", "a cat"])
    with torch.no_grad():
        want = model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
        model.to("cuda", torch.bfloat16)
        got = (model.encode_image(images.to("cuda", torch.bfloat16), normalize=True).float().cpu(),
               model.encode_text(tokens.cuda(), normalize=True).float().cpu())
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 5e-2


def gpu_training(tmp_path, ranks: int):
    from data_pipelines.writer import ShardSetWriter
    from launch.launcher import run_training
    from test_train_run import colour_records, metrics, tiny_config

    with ShardSetWriter(tmp_path / "shards", "colours", maxcount=16) as writer:
        for record in colour_records():
            writer.write(record)
    config = tiny_config(tmp_path, f"cuda-{ranks}", train={"batch_size": 8, "accum_freq": 1, "steps": 6,
                                                          "precision": "bf16"},
                         parallel={"num_procs": ranks, "ep_size": ranks, "accelerator": "cuda"},
                         checkpoint={"every": 3})
    run_dir = run_training(config)
    return run_dir, metrics(run_dir), (run_dir / "out.log").read_text()


def assert_trained_and_exported(records, out_log):
    from launch.trainer import read_export_check

    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert "experts: batched matmuls" in out_log  # chosen by train.batched_experts: auto on CUDA
    difference, tolerance = read_export_check(out_log)
    assert difference <= tolerance


@pytest.mark.slow
def test_training_on_one_gpu_through_the_launcher_exports_what_it_trained(tmp_path):
    _, records, out_log = gpu_training(tmp_path, ranks=1)
    assert "1 ranks (ep_size 1, ZeRO 1, bf16)" in out_log
    assert_trained_and_exported(records, out_log)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_expert_parallel_training_on_two_gpus(tmp_path):
    _, records, out_log = gpu_training(tmp_path, ranks=2)
    assert "2 ranks (ep_size 2, ZeRO 1, bf16)" in out_log
    assert_trained_and_exported(records, out_log)
