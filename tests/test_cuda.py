"""The GPU paths checked against the CPU. Skipped where there is no CUDA device (CI); run on a
lent GPU machine with ``pytest tests/test_cuda.py``.

TF32 is switched off so the GPU computes in float32 like the CPU, and the two must agree to
float32 rounding; bf16 autocast is checked against float32 on the same GPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import softvq
from softvq.bottlenecks.soft_assign import soft_assign
from softvq.generation.mar import MARConfig, MaskedAutoregressive, random_orders
from softvq.generation.checkpoint import GeneratorMeta
from softvq.generation.guidance import Guidance
from softvq.generation.models import GeneratorConfig, build_generator
from softvq.generation.sampling import SamplerSpec, sample_latents
from softvq.losses.lpips import LPIPS
from softvq.networks.generative import decoder_input

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = torch.device("cuda")


@pytest.fixture(autouse=True)
def float32_matmuls():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_tokenizer_forward_and_gradients_equal_the_cpu():
    torch.manual_seed(0)
    cpu = softvq.Tokenizer.from_preset("softvq-tiny").eval()
    gpu = softvq.Tokenizer.from_preset("softvq-tiny").eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.to(GPU)
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    out_cpu, out_gpu = cpu(images), gpu(images.to(GPU))
    assert out_gpu.reconstruction.device.type == "cuda"
    assert relative(out_gpu.encoding.latents, out_cpu.encoding.latents) < 1e-4
    assert relative(out_gpu.reconstruction, out_cpu.reconstruction) < 1e-4
    out_cpu.reconstruction.square().mean().backward()
    out_gpu.reconstruction.square().mean().backward()
    grads_gpu = dict(gpu.named_parameters())
    for name, p in cpu.named_parameters():
        if p.grad is not None and p.grad.norm() > 0:
            assert relative(grads_gpu[name].grad, p.grad) < 1e-3, name


def test_generative_decoder_noise_from_a_cpu_generator_matches_the_cpu():
    """WeTok's generative decoder draws its noise from the seed on any device."""
    latents = torch.randn(2, 16, 8)
    expected = decoder_input(latents, 4, generator=torch.Generator().manual_seed(5))
    got = decoder_input(latents.to(GPU), 4, generator=torch.Generator().manual_seed(5))
    assert got.device.type == "cuda" and torch.equal(got.cpu(), expected)
    assert not torch.equal(decoder_input(latents.to(GPU), 4, generator=torch.Generator().manual_seed(6)), got)
    torch.manual_seed(0)
    model = softvq.Tokenizer.from_preset("softvq-tiny").with_generative_decoder(4).to(GPU).eval()
    with torch.inference_mode():  # and decode takes such a generator on the GPU
        images = model.decode(latents.to(GPU), generator=torch.Generator().manual_seed(5))
    assert images.shape == (2, 3, 64, 64) and images.device.type == "cuda"


def test_bf16_autocast_stays_close_to_float32_on_the_s_preset():
    torch.manual_seed(0)
    model = softvq.Tokenizer.from_preset("softvq-s-64").to(GPU).eval()
    images = torch.rand(2, 3, 256, 256, device=GPU) * 2 - 1
    with torch.inference_mode():
        exact = model(images)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fast = model(images)
    assert fast.encoding.latents.dtype == torch.float32  # the bottleneck runs in float32 under autocast
    assert relative(fast.encoding.latents, exact.encoding.latents) < 0.05
    assert relative(fast.reconstruction, exact.reconstruction) < 0.05
    # and it is not trivially equal: bf16 really ran
    assert relative(fast.reconstruction, exact.reconstruction) > 0
    # Tokenizer.enable_autocast (the CLI's --precision bf16) computes the same, handing back float32
    with torch.inference_mode():
        switched = model.enable_autocast("bf16")(images)
    assert switched.reconstruction.dtype == torch.float32
    assert relative(switched.reconstruction, fast.reconstruction.float()) < 1e-3


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_chunked_soft_assignment_on_the_gpu_equals_straightforward_and_the_cpu(distance):
    torch.manual_seed(0)
    x0, codebook0 = torch.randn(2048, 16), torch.randn(1024, 16)
    if distance == "cosine":  # the release's cosine affinity is between unit vectors
        x0, codebook0 = F.normalize(x0, dim=-1), F.normalize(codebook0, dim=-1)
    upstream = torch.randn(2048, 16)

    def run(device, chunk):
        x = x0.to(device).requires_grad_()
        codebook = codebook0.to(device).requires_grad_()
        out = soft_assign(x, codebook, scale=torch.tensor(10.0, device=device), distance=distance,
                          entropy_temperature=0.01, chunk_size=chunk)
        batch_entropy = -(out.mean_posterior * out.mean_posterior.clamp_min(1e-30).log()).sum()
        loss = (out.latents * upstream.to(device)).sum() + out.token_entropy - batch_entropy
        loss.backward()
        return out.latents, out.token_entropy, x.grad, codebook.grad

    lean, plain, cpu = run(GPU, 300), run(GPU, 0), run("cpu", 0)
    for a, b, c in zip(lean, plain, cpu):
        assert relative(a, b) < 1e-5
        assert relative(a, c) < 1e-4


def test_lpips_on_the_gpu_equals_the_cpu():
    torch.manual_seed(0)
    a, b = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    metric = LPIPS("vgg")
    expected = metric(a, b)
    got = metric.to(GPU)(a.to(GPU), b.to(GPU))
    assert relative(got, expected) < 1e-4


def perturbed_pair(make):
    """The same randomly initialised generator on the CPU and the GPU. Zero-initialised layers
    (adaLN-zero, output heads) are perturbed so every path matters."""
    torch.manual_seed(0)
    cpu = make().eval()
    for p in cpu.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    gpu = make().eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.to(GPU)


def seeded(seed: int = 3) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind, method", [("sit", "sde"), ("sit", "heun"), ("dit", "ddpm")])
def test_dit_and_sit_forward_and_seeded_sampling_equal_the_cpu(kind, method):
    config = GeneratorConfig(kind=kind, num_tokens=8, latent_dim=4, width=64, depth=2, heads=4, num_classes=3)
    cpu, gpu = perturbed_pair(lambda: build_generator(config))
    x, t, y = torch.randn(3, 8, 4), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 1, 3])
    if kind == "dit":
        t = (t * 999).long()
    assert relative(gpu(x.to(GPU), t.to(GPU), y.to(GPU)), cpu(x, t, y)) < 1e-4

    meta, labels = GeneratorMeta(objective=kind), torch.tensor([0, 1, 2, 1])
    spec = SamplerSpec(method=method, steps=12, guidance=Guidance(scale=1.5))
    first = sample_latents(gpu, meta, labels, spec, generator=seeded())
    assert first.device.type == "cuda"
    # every draw (first noise and each SDE/DDPM step) comes from the seed, not the global RNG
    torch.cuda.manual_seed(123)
    assert torch.equal(first, sample_latents(gpu, meta, labels, spec, generator=seeded()))
    assert relative(first, sample_latents(cpu, meta, labels, spec, generator=seeded())) < 1e-4


def test_mar_encoder_and_seeded_sampling_agree_between_gpu_and_cpu():
    config = MARConfig(num_tokens=12, latent_dim=4, width=32, depth=1, heads=2, num_classes=3, buffer_size=2,
                       head_width=32, head_depth=1)
    cpu, gpu = perturbed_pair(lambda: MaskedAutoregressive(config))
    x, labels = torch.randn(2, 12, 4), torch.tensor([0, 2])
    orders = random_orders(2, 12, seeded(1))
    z_cpu = cpu.condition(cpu.encode(x, orders, 7, labels), orders, 7)
    z_gpu = gpu.condition(gpu.encode(x.to(GPU), orders.to(GPU), 7, labels.to(GPU)), orders.to(GPU), 7)
    assert relative(z_gpu, z_cpu) < 1e-4

    def sample(model):  # clip_x0 keeps the untrained head's samples bounded (see DiffusionLoss.sample)
        return model.sample(labels, ar_steps=4, diffusion_steps=10, cfg=2.0, generator=seeded(), clip_x0=3.0)

    first = sample(gpu)
    torch.cuda.manual_seed(123)
    assert first.device.type == "cuda" and torch.equal(first, sample(gpu))  # seeded sampling repeats
    assert relative(first, sample(cpu)) < 1e-4  # and draws what the CPU draws


def test_a_cpu_run_then_a_gpu_run_in_one_process_each_get_their_device():
    """accelerate remembers the first run's device in a process-wide singleton; each of our runs
    must get the device it asks for."""
    from softvq.training.accelerator import new_accelerator

    assert new_accelerator(cpu=True).device.type == "cpu"
    assert new_accelerator(mixed_precision="bf16").device.type == "cuda"
    assert new_accelerator(cpu=True).device.type == "cpu"



def test_generator_training_on_the_gpu_resumes_to_the_straight_run(tmp_path):
    """The GPU loop copies its batches through pinned memory without waiting for the queued steps
    and reads back one flag a step (is the step finite?); interrupted after 2 of 4 steps and resumed, it must end
    where a straight run ends (the CPU draws other noise, so the GPU is compared with itself)."""
    from softvq.generation.latent_sources import LatentSource
    from softvq.generation.pretokenize import pretokenize
    from softvq.generation.train import GeneratorTrainConfig, train_generator

    torch.manual_seed(0)
    tokenizer = softvq.Tokenizer.from_preset("softvq-tiny", image_size=32)
    g = torch.Generator().manual_seed(0)
    samples = [(torch.rand(3, 32, 32, generator=g) * 2 - 1, i % 2, f"img{i}") for i in range(8)]
    pretokenize(tokenizer, LatentSource(iter(samples), ["a", "b"], 8), tmp_path / "lat", progress=False)
    common = dict(latents=str(tmp_path / "lat"), objective="sit", width=32, depth=1, heads=2, batch_size=4,
                  log_every=1, checkpoint_every=2)
    straight = train_generator(GeneratorTrainConfig(out=str(tmp_path / "a"), steps=4, **common), progress=False)
    train_generator(GeneratorTrainConfig(out=str(tmp_path / "b"), steps=2, **common), progress=False)
    resumed = train_generator(GeneratorTrainConfig(out=str(tmp_path / "b"), steps=4, **common), progress=False)
    assert all(map(math.isfinite, (straight["first_loss"], straight["last_loss"])))
    assert abs(resumed["last_loss"] - straight["last_loss"]) <= 1e-5 * abs(straight["last_loss"])


def test_a_run_started_before_cuda_gives_the_cuda_generator_back_as_if_it_had_not_run():
    """In a fresh process CUDA starts lazily, seeded with torch's seed; a run that seeds and draws
    on the GPU must leave the caller's next GPU draws as they would have been."""
    import subprocess
    import sys

    script = """
import torch
from softvq.training.checkpointing import capture_rng, restore_rng
torch.manual_seed(5)
state = capture_rng()
if {train}:
    torch.manual_seed(123)  # what a run does
    torch.randn(10, device="cuda")
    restore_rng(state)
print(torch.randn(3, device="cuda").tolist())
"""
    draws = [subprocess.run([sys.executable, "-c", script.format(train=train)], capture_output=True, text=True,
                            check=True).stdout for train in (False, True)]
    assert draws[0] == draws[1]
