"""Images/s and peak memory of one full tokenizer training step, all losses on.

A step = tokenizer forward, generator loss (L2 + LPIPS-VGG + alignment + adversarial + KL,
paper Eq. 7), backward, AdamW step, then the discriminator loss (hinge + bCR + LeCAM on
DiffAugment-ed images), backward, step. Offline the discriminator and the alignment target fall
back to VGG16 features (logged); with DINO weights they are the paper's networks.

    python benchmarks/bench_train_step.py                          # CPU: tiny and S
    python benchmarks/bench_train_step.py --presets softvq-s-64 softvq-b-64 --device cuda --dtype bf16
    python benchmarks/bench_train_step.py --profile softvq-tiny     # torch profiler table of one step

Peak memory: CUDA's max_memory_allocated on a GPU; on CPU the process' resident-set high-water
mark (ru_maxrss), measured in a fresh subprocess per preset so presets don't see each other.
Each subprocess keeps glibc's allocation defaults, as ``softvq train`` does;
``--retain-freed-memory`` applies :mod:`softvq.cpu_allocator` instead (no gain for a training
step: see that module).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
import time

import torch

import softvq
from softvq.cpu_allocator import retain_freed_memory
from softvq.cli.common import positive_int, timing_device_argument
from softvq.losses.objective import ObjectiveConfig, TokenizerObjective
from softvq.messages import ignored_flags
from softvq.networks.vit import reference_math
from softvq.precision import PRECISIONS
from softvq.training.ema import EMA
from softvq.training.schedule import build_scheduler

from bench_tokenizer import child_result, machine  # this folder: run as ``python benchmarks/bench_train_step.py``


class Run:
    """What a training step touches, as the trainer builds it: the tokenizer, its objective, both
    AdamW optimizers with the recipe's lr schedule, and the EMA of the weights."""

    def __init__(self, preset: str, device: torch.device) -> None:
        torch.manual_seed(0)
        self.model = softvq.Tokenizer.from_preset(preset).to(device).train()
        cfg = ObjectiveConfig(perceptual_warmup_steps=0, discriminator_start=0, discriminator="vgg",
                              alignment_target="vgg")
        self.objective = TokenizerObjective(cfg, self.model).to(device)
        self.gen_params = list(self.model.parameters()) + self.objective.generator_parameters()
        self.opt_g = torch.optim.AdamW(self.gen_params, lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4)
        self.opt_d = torch.optim.AdamW(self.objective.discriminator_parameters(), lr=1e-4, betas=(0.9, 0.95))
        # the recipe's warm-up and cosine decay (paper.yaml: 5k of 250k steps), as the trainer builds them
        self.schedules = [build_scheduler(opt, total_steps=250_000, warmup_steps=5_000)
                          for opt in (self.opt_g, self.opt_d)]
        self.ema = EMA(self.model)


def step(run: Run, images, index, autocast, syncs: bool = False):
    """One step, as ``Trainer.train_step`` makes it (one micro-batch, one process): both losses and
    backward passes, both gradients clipped (paper.yaml's 1.0), both optimizers and schedules
    stepped, the EMA updated. ``syncs=True`` reads values back to the host the way the trainer did
    before it was changed (loss and D-loss finiteness, both log dicts, the gradient norm: ~6 syncs
    a step); ``False`` is the trainer's current single sync."""
    with autocast:
        out = run.model(images)
        loss, _ = run.objective.generator_loss(images, out, index, as_tensors=not syncs)
    if syncs:
        bool(torch.isfinite(loss).item())
    run.opt_g.zero_grad(set_to_none=True)
    loss.backward()
    with autocast:
        d_loss, _ = run.objective.discriminator_loss(images, out.reconstruction.detach(), index,
                                                     as_tensors=not syncs)
    run.opt_d.zero_grad(set_to_none=True)
    if d_loss.requires_grad:
        if syncs:
            bool(torch.isfinite(d_loss).item()), float(d_loss)
        d_loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([p for p in run.gen_params if p.grad is not None], 1.0)
    disc_grads = [p for p in run.objective.discriminator_parameters() if p.grad is not None]
    disc_norm = torch.nn.utils.clip_grad_norm_(disc_grads, 1.0) if disc_grads else torch.zeros(())
    if syncs:
        float(norm), float(loss)
    else:
        bool(torch.isfinite(torch.stack([norm, disc_norm.to(norm.device), loss.detach(), d_loss.detach()])).all())
    run.opt_g.step()
    if disc_grads:
        run.opt_d.step()
    for schedule in run.schedules:
        schedule.step()
    run.ema.update(run.model)


def measure(preset: str, device_name: str, dtype_name: str, batch: int, steps: int, explicit: bool,
            syncs: bool = False) -> dict:
    device = torch.device(device_name)
    dtype = PRECISIONS[dtype_name]  # --dtype offers fp32 and bf16
    run = Run(preset, device)
    # the plain research baseline (explicit attention, residual updates in their own pass) for the whole step
    with reference_math(run.model) if explicit else contextlib.nullcontext():
        return _time_steps(run, preset, device, dtype, batch, steps, syncs)


def _memory_mib(device: torch.device) -> tuple[float, float]:
    """(memory now, its high-water mark) in MiB: CUDA's allocated memory, or the process's
    resident set (/proc's statm, and ru_maxrss, which Linux counts in KiB)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated() / 2**20, torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return (resident_pages * resource.getpagesize() / 2**20,
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _time_steps(run: Run, preset, device, dtype, batch, steps, syncs) -> dict:
    size = run.model.config.image_size
    images = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    built, _ = _memory_mib(device)  # the networks and the inputs, before any step
    step(run, images, 0, autocast, syncs)  # warm-up: also makes the optimizers' moments
    times = []
    for i in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(run, images, i + 1, autocast, syncs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    _, peak = _memory_mib(device)
    seconds = statistics.median(times)
    return {"preset": preset, "image_size": size, "batch": batch, "img_s": batch / seconds, "s_per_step": seconds,
            "s_range": (min(times), max(times)), "peak_MiB": peak, "step_MiB": peak - built}


def profile(preset: str, batch: int) -> None:
    run = Run(preset, torch.device("cpu"))
    size = run.model.config.image_size
    images = torch.rand(batch, 3, size, size) * 2 - 1
    step(run, images, 0, contextlib.nullcontext())
    from torch.profiler import profile as torch_profile

    with torch_profile() as prof:
        step(run, images, 1, contextlib.nullcontext())
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Bad values are usage errors here, not failures of the per-preset processes, as in ``softvq bench gen``.
    parser.add_argument("--presets", nargs="+", default=["softvq-tiny", "softvq-s-64"],
                        choices=sorted(softvq.PRESETS), metavar="PRESET",
                        help="presets to time (default softvq-tiny softvq-s-64; softvq info lists them)")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--steps", type=positive_int, default=2)
    parser.add_argument("--device", default="cpu", type=timing_device_argument)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--baseline", action="store_true", help="also time explicit fp32 attention")
    parser.add_argument("--syncs", action="store_true",
                        help="also time the step with the ~6 host-device syncs the trainer used to make")
    parser.add_argument("--profile", metavar="PRESET", choices=sorted(softvq.PRESETS),
                        help="print the torch profiler's table of one step of PRESET instead")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="apply softvq.cpu_allocator.retain_freed_memory instead of glibc's defaults")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one preset, print JSON
    args = parser.parse_args()
    retained = args.retain_freed_memory and retain_freed_memory()

    if args.profile:
        given = [flag for flag, value in (("--device", args.device != "cpu"), ("--dtype", args.dtype != "fp32"),
                                          ("--baseline", args.baseline), ("--syncs", args.syncs)) if value]
        if given:  # the profile is of one CPU fp32 step
            refusal = ignored_flags(given, "the timing table", reason="--profile profiles one CPU fp32 step")
            parser.error(f"argument --profile: {refusal}")
        profile(args.profile, args.batch)
        return
    if args.one:
        preset, explicit, syncs = args.one.split(":")
        print(json.dumps(measure(preset, args.device, args.dtype, args.batch, args.steps, explicit == "1", syncs == "1")))
        return

    rows = []
    variants = ([("0", args.dtype, "0")] + ([("0", args.dtype, "1")] if args.syncs else [])
                + ([("1", "fp32", "0")] if args.baseline else []))
    for preset in args.presets:
        for explicit, dtype, syncs in variants:
            cmd = [sys.executable, __file__, "--one", f"{preset}:{explicit}:{syncs}", "--device", args.device,
                   "--dtype", dtype, "--batch", str(args.batch), "--steps", str(args.steps)]
            cmd += ["--retain-freed-memory"] if args.retain_freed_memory else []
            result = child_result(cmd, f"{preset} ({dtype})")
            result["variant"] = (f"{dtype}, {'plain (explicit attention, unfused)' if explicit == '1' else 'SDPA, fused'}"
                                 f"{', ~6 syncs/step (old trainer)' if syncs == '1' else ''}")
            rows.append(result)
            print(f"done {preset} {result['variant']}", flush=True)

    where = machine(torch.device(args.device))
    allocator = "freed memory retained" if retained else "default malloc"
    memory = ("CUDA allocated memory" if torch.device(args.device).type == "cuda" else
              "the process's resident set (ru_maxrss)")
    print(f"\nTraining step, all losses on (VGG discriminator + VGG alignment target), clips, EMA and schedules as "
          f"the trainer makes them, batch {args.batch}, median of {args.steps} steps after one warm-up, {where}, "
          f"{allocator}. Memory: {memory}; peak = its high-water mark, step = the peak less what the built "
          f"networks held before the first step (the optimizers' moments, activations, gradients)")
    print("| preset | px | variant | img/s | s/step (min-max) | peak MiB | step MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        low, high = r["s_range"]
        print(f"| {r['preset']} | {r['image_size']} | {r['variant']} | {r['img_s']:.2f} | {r['s_per_step']:.2f} "
              f"({low:.2f}-{high:.2f}) | {r['peak_MiB']:.0f} | {r['step_MiB']:.0f} |")


if __name__ == "__main__":
    main()
