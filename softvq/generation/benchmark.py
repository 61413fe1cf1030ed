"""The generator efficiency table of paper Tab. 1: forward GFLOPs per image and sampling throughput
for each size (S, B, L, XL) and latent layout, measured in one run (``softvq bench gen``).

Layouts: SoftVQ's 1D tokens (32 tokens of D = 64, 64 tokens of D = 32; patch 1) and, for
comparison, KL-VAE-style 2D grids of 4 channels (16x16 and 32x32, patch 2: 64 and 256 tokens).

GFLOPs are multiply-accumulates (the DiT / SiT papers' convention), counted on the meta device
(:mod:`softvq.generation.flops`) and reported two ways: ``linear`` (linear layers only; this is
what reproduces the SoftVQ paper's DiT-XL 14.52 / 28.81) and ``all`` (plus the attention matmuls,
the DiT paper's convention: DiT-XL/2 = 118.6). The paper's SiT-XL numbers also count the REPA
projector of the released SiT; the table shows that sum next to them.

Throughput is images/s at batch 64 in fp32 (the paper's setting, on one MI250): the median time
of ``timed_steps`` network evaluations, extrapolated to the sampler's full evaluation count
(SiT: 250-step SDE, DiT: 250-step DDPM; no guidance). On a CPU this extrapolation is the only
affordable measurement, and large sizes may be skipped with ``max_gmacs_cpu``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from softvq.generation.flops import PAPER_GFLOPS, analytic_macs, count_macs, repa_projector_macs
from softvq.generation.mar import MARConfig
from softvq.generation.models import GeneratorConfig, build_generator, generator_config

LAYOUTS: dict[str, dict] = {
    "32 tokens": {"layout": "1d", "num_tokens": 32, "latent_dim": 64},
    "64 tokens": {"layout": "1d", "num_tokens": 64, "latent_dim": 32},
    "16x16/2": {"layout": "2d", "grid": 16, "latent_dim": 4, "patch_size": 2},
    "32x32/2": {"layout": "2d", "grid": 32, "latent_dim": 4, "patch_size": 2},
    "64x64/2": {"layout": "2d", "grid": 64, "latent_dim": 4, "patch_size": 2},  # 512 px, Tab. 2
}


DISPLAY = {"dit": "DiT", "sit": "SiT"}


@dataclass
class Row:
    """One line of Tab. 1's efficiency table: a generator's size and layout, its parameters (millions),
    GMACs per forward counted three ways (linear layers, everything, and the paper's convention), the
    paper's GFLOPs where it gives them, and the measured images/s."""
    kind: str
    size: str
    layout: str
    tokens: int
    params_m: float
    gmacs_linear: float
    gmacs_all: float
    gmacs_paper_convention: float  # linear, + REPA projector for SiT
    paper_gflops: float | None
    images_per_s: float | None
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _skipped_on_cpu(device: torch.device, gmacs_per_image: float, max_gmacs_cpu: float) -> str:
    """The note of a model too large to time on a CPU (minutes a pass on 2 cores), or "" to time it."""
    if device.type == "cpu" and gmacs_per_image > max_gmacs_cpu:
        return f"throughput skipped on CPU ({gmacs_per_image:.0f} GMACs/img; --max-gmacs-cpu)"
    return ""


def _own_random_streams(device: torch.device):
    """The timings seed torch for repeatable random weights: the caller's random streams are given back."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def time_forward(config: GeneratorConfig, batch: int, device: torch.device, repeats: int = 3) -> float:
    """Median seconds of one fp32 forward pass at ``batch`` (after one warm-up pass)."""
    with _own_random_streams(device):
        return _time_forward(config, batch, device, repeats)


def _time_forward(config: GeneratorConfig, batch: int, device: torch.device, repeats: int) -> float:
    torch.manual_seed(0)
    model = build_generator(config).to(device).eval()
    x = torch.randn((batch, *model.input_shape), device=device)
    t = torch.rand(batch, device=device) if config.kind == "sit" else torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, config.num_classes, (batch,), device=device)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            model(x, t, y)
            _sync(device)
            if i:
                times.append(time.perf_counter() - start)
    del model
    return sorted(times)[len(times) // 2]


def generator_table(kinds=("dit", "sit"), sizes=("S", "B", "L", "XL"), layouts=tuple(LAYOUTS), *,
                    device: str | torch.device = "cpu", batch: int = 64, sampling_steps: int = 250,
                    repeats: int = 2, max_gmacs_cpu: float = 30.0, throughput: bool = True,
                    progress: bool = True) -> list[Row]:
    """Measure every (kind, size, layout). On CPU, throughput is skipped for models whose batch
    forward exceeds ``max_gmacs_cpu`` x 64 GMACs (minutes per pass on 2 cores)."""
    device = torch.device(device)
    combos = [(k, s, lay) for k in kinds for s in sizes for lay in layouts]
    rows = []
    for kind, size, layout in combos:
        cfg = generator_config(kind, size, num_classes=1000, **LAYOUTS[layout])
        counted = count_macs(cfg)
        analytic = analytic_macs(cfg)
        if abs(counted.total - analytic.total) > 1e-6 * analytic.total:
            raise RuntimeError(f"FLOP counter and analytic count disagree for {kind}-{size} {layout}")
        with torch.device("meta"):
            params = build_generator(cfg).num_parameters() / 1e6
        paper_conv = counted.linear + (repa_projector_macs(cfg) if kind == "sit" else 0.0)
        paper = PAPER_GFLOPS.get((kind, layout)) if size == "XL" else None
        ips, note = None, ""
        if throughput:
            per_image = counted.total / 1e9
            note = _skipped_on_cpu(device, per_image, max_gmacs_cpu)
            if not note:
                if progress:
                    print(f"  timing {kind}-{size} {layout} ...", flush=True)
                seconds = time_forward(cfg, batch, device, repeats)
                ips = batch / (seconds * sampling_steps)
        rows.append(Row(kind, size, layout, cfg.sequence_length, params, counted.linear / 1e9,
                        counted.total / 1e9, paper_conv / 1e9, paper[0] if paper else None, ips, note))
    return rows


def format_table(rows: list[Row], device_label: str, sampling_steps: int = 250, batch: int = 64) -> str:
    """A plain-text table with the paper's values beside ours, and the 1D/2D GFLOP ratios."""
    paper_ips = {(k, lay): v[1] for (k, lay), v in PAPER_GFLOPS.items()}
    head = (f"{'model':<8} {'layout':<10} {'tok':>4} {'params':>8} {'GMACs lin':>10} {'GMACs all':>10} "
            f"{'paper-conv':>10} {'paper':>7} {'Δ%':>6} {'img/s':>9} {'paper img/s':>11}  note")
    timed = any(r.images_per_s is not None for r in rows)
    setting = f"batch {batch}, fp32, {sampling_steps} sampling steps, no CFG" if timed else "GMACs only, nothing timed"
    lines = [f"generator efficiency ({setting}) on {device_label}", head, "-" * len(head)]
    for r in rows:
        name = f"{DISPLAY[r.kind]}-{r.size}"
        delta = f"{100 * (r.gmacs_paper_convention / r.paper_gflops - 1):+.1f}" if r.paper_gflops else ""
        paper = f"{r.paper_gflops:.2f}" if r.paper_gflops else ""
        ips = f"{r.images_per_s:.3g}" if r.images_per_s is not None else "-"
        pips = paper_ips.get((r.kind, r.layout)) if r.size == "XL" else None
        lines.append(f"{name:<8} {r.layout:<10} {r.tokens:>4} {r.params_m:>7.1f}M {r.gmacs_linear:>10.2f} "
                     f"{r.gmacs_all:>10.2f} {r.gmacs_paper_convention:>10.2f} {paper:>7} {delta:>6} {ips:>9} "
                     f"{(f'{pips:.2f}' if pips else ''):>11}  {r.note}")
    by_key = {(r.kind, r.size, r.layout): r for r in rows}
    ratios = []
    for kind, size in dict.fromkeys((r.kind, r.size) for r in rows):
        ref = by_key.get((kind, size, "32x32/2"))
        parts = [f"{lay} {ref.gmacs_all / by_key[(kind, size, lay)].gmacs_all:.1f}x"
                 for lay in ("32 tokens", "64 tokens") if ref and (kind, size, lay) in by_key]
        if parts:
            ratios.append(f"{DISPLAY[kind]}-{size}: " + ", ".join(parts))
    if ratios:
        lines += ["", "fewer GMACs (all matmuls) than the same model on a 32x32 grid with patch 2:"] + ["  " + s for s in ratios]
    lines += ["", "GMACs lin: linear layers only; all: + attention matmuls (DiT paper convention); paper-conv: "
              "linear + the REPA projector the released SiT runs (reproduces Tab. 1). paper: Tab. 1, 64x64/2 Tab. 2 "
              "(its 2D rows, 80.73/81.92 and 373.34/373.32, follow neither convention: DiT's own counts for XL/2 are 118.6 "
              "at 256 px and 524.6 at 512 px, our 'all')."
              + (" img/s: batch / (median forward time x sampling steps)." if timed else "")]
    return "\n".join(lines)


def time_mar_sampling(config: MARConfig, batch: int, device: torch.device, diffusion_steps: int = 100) -> float:
    """Seconds MAR's own sampler takes for ``batch`` images (after a one-step warm-up): one
    autoregressive step per token with ``diffusion_steps`` head steps each (MAR's evaluation
    setting), without guidance, as the DiT / SiT rows. Timed whole, not extrapolated: the head's
    batch shrinks and grows with the tokens each step reveals."""
    with _own_random_streams(device):
        return _time_mar_sampling(config, batch, device, diffusion_steps)


def _time_mar_sampling(config: MARConfig, batch: int, device: torch.device, diffusion_steps: int) -> float:
    torch.manual_seed(0)
    model = build_generator(config).to(device).eval()
    labels = torch.randint(0, config.num_classes, (batch,), device=device)
    model.sample(labels, ar_steps=1, diffusion_steps=1)  # kernels and allocator warmed up
    _sync(device)
    start = time.perf_counter()
    model.sample(labels, diffusion_steps=diffusion_steps)
    _sync(device)
    del model
    return time.perf_counter() - start


def mar_table(*, throughput: bool = False, device: str | torch.device = "cpu", batch: int = 64,
              diffusion_steps: int = 100, max_gmacs_cpu: float = 30.0, progress: bool = True) -> str:
    """MAR-H GFLOPs per image (meta device) beside the paper's Tab. 1 (256 px), for the three tokenizers
    it lists. Convention (:func:`softvq.generation.flops.count_mar_macs`): the first sampling step
    of the transformer plus one diffusion-head evaluation per token. With ``throughput``, also
    images/s of the whole sampler at ``batch`` in fp32 (:func:`time_mar_sampling`; Sec. 4.1: batch
    64, fp32, one MI250), skipped on a CPU above ``max_gmacs_cpu`` GMACs per image."""
    from softvq.generation.flops import PAPER_TABLE1_MAR, analytic_mar_macs, count_mar_macs
    from softvq.generation.mar import mar_config

    device = torch.device(device)
    head = (f"{'model':<6} {'tokenizer':<18} {'tok':>4} {'D':>3} {'params':>8} {'GMACs':>7} {'paper':>7} {'Δ%':>6} "
            f"{'img/s':>9} {'paper img/s':>11}  note")
    lines = ["MAR-H generator cost (paper Tab. 1, 256x256" +
             (f"; img/s: batch {batch}, fp32, {diffusion_steps} head steps, no CFG)" if throughput else ")"),
             head, "-" * len(head)]
    for (tokens, dim), (name, paper, paper_ips) in PAPER_TABLE1_MAR.items():
        cfg = mar_config("H", num_tokens=tokens, latent_dim=dim)
        counted = count_mar_macs(cfg)
        if abs(counted.total - analytic_mar_macs(cfg).total) > 1e-6 * counted.total:
            raise RuntimeError(f"FLOP counter and analytic count disagree for MAR-H on {tokens} tokens")
        params = build_generator(cfg, device="meta").num_parameters() / 1e6
        gmacs = counted.total / 1e9
        ips, note = "-", _skipped_on_cpu(device, gmacs, max_gmacs_cpu) if throughput else ""
        if throughput and not note:
            if progress:
                print(f"  timing MAR-H on {tokens} tokens ...", flush=True)
            ips = f"{batch / time_mar_sampling(cfg, batch, device, diffusion_steps):.3g}"
        lines.append(f"{'MAR-H':<6} {name:<18} {tokens:>4} {dim:>3} {params:>7.1f}M {gmacs:>7.2f} {paper:>7.2f} "
                     f"{100 * (gmacs / paper - 1):>+6.1f} {ips:>9} {paper_ips:>11.2f}  {note}")
    lines += ["", "GMACs: the transformer at the first sampling step (encoder on the 64 buffer tokens, decoder "
              "on all) + one diffusion-head pass per token, attention included. This reproduces the SoftVQ rows "
              "within 1%; the paper's KL-16 row (145.08) is below the decoder on 320 tokens plus the head "
              "(126 + 39 GMACs), so it was counted some other way."]
    if throughput:
        lines[-1] += " img/s: batch / the sampler's whole time (one step per token), measured, not extrapolated."
    return "\n".join(lines)
