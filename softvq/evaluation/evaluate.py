"""Evaluate a tokenizer on a fixed image set: rFID, PSNR, SSIM, LPIPS, codebook use, latent moments,
cost. What ``softvq eval`` runs.

Protocol (fixed, and written into every report under ``protocol``):

* images: the first ``num_images`` of the source in a fixed order (folder: sorted by relative
  path; shards: shard then member order). The paper's rFID uses the 50,000 ImageNet validation
  images (Sec. 4.1), hence the default ``num_images=50000``. Unreadable files among them are
  skipped and counted (``skipped_images``; the report's ``num_images`` counts the images measured);
* each image is resized and centre-cropped to the model's resolution as ADM does (box halvings,
  PIL bicubic, middle square: ``center_crop_resize``);
* reconstructions are clamped to [-1, 1] and rounded to 8 bits, as a saved PNG would be; every
  metric compares 8-bit originals with 8-bit reconstructions;
* rFID: FID between Inception pool3 features of the originals and of the reconstructions
  (:mod:`softvq.evaluation.inception`, :mod:`softvq.evaluation.fid`); the originals' statistics
  are cached in a ``.npz`` keyed by the protocol and the files' relative paths, sizes and
  modification times, with the number and a digest of the images they were made from: when the
  images measured are not those (a file became unreadable, or changed under the same size and
  time), the statistics are recomputed in a second pass over the originals, with a note. FID is
  biased upwards at small N: compare numbers only at equal N;
* PSNR / SSIM: per image on the 0..255 scale (``data_range=255``), averaged;
* LPIPS (VGG and AlexNet, v0.1 heads): per image on [-1, 1] inputs, averaged;
* codebook usage / perplexity: exact counts of the argmax codes over the whole set;
* latent mean / std: over every value of z (the decoder input) of the whole set, float64;
* cost: encoder and decoder FLOPs of one image counted by ``torch.utils.flop_counter``, reported
  as GMACs (multiply-accumulates, what the DiT/SoftVQ tables call "GFLOPs") and GFLOPs (= 2 x
  MACs); throughput in images/s of encode and decode alone at the evaluation batch size.

50,000 images take hours on a CPU. With a ``state_file`` the running sums of every metric are
saved there every few minutes (atomically, at batch boundaries); an interrupted evaluation of
the same weights on the same images with the same options continues from it, and gives the
report an uninterrupted one gives (throughput aside).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from softvq.data.images import CENTER_CROP, quantize_to_uint8
from softvq.eval_mode import evaluating
from softvq.evaluation import fid as fidlib
from softvq.evaluation.metrics import CodebookUsage, RunningMoments, codebook_rows, probs_rows, psnr, ssim
from softvq.evaluation.saved_state import KeptWork, load_saved_state, save_state
from softvq.evaluation.sources import list_image_refs, readable_batches, skipped_note, uint8_to_model
from softvq.resume import listing_sha1, weights_sha1
from softvq.tokenizer import images_from_softvq_loaders

if TYPE_CHECKING:
    from softvq.evaluation.inception import Normalization, Resize
    from softvq.tokenizer import Tokenizer

PAPER_NUM_IMAGES = 50_000
DEFAULT_CACHE = Path("~/.cache/softvq/fid-stats")


@dataclass
class EvalOptions:
    """Knobs of :func:`evaluate_tokenizer` (defaults = the documented protocol)."""

    num_images: int = PAPER_NUM_IMAGES
    batch_size: int = 16
    image_size: int | None = None          # default: the model's training resolution
    fid: bool = True
    fid_weights: str | None = None          # see softvq.evaluation.inception.find_fid_weights
    fid_normalization: Normalization = "tf"
    fid_resize: Resize = "tf"               # the TF graph's bilinear resize to 299, or pytorch-fid's
    reference_stats: str | Path | None = None  # .npz cache of the originals' statistics
    cache_dir: str | Path | None = DEFAULT_CACHE
    lpips_nets: Sequence[str] = ("vgg", "alex")
    workers: int = 0
    progress: bool = True
    count_flops: bool = True

    def __post_init__(self) -> None:
        for name in ("num_images", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"EvalOptions.{name} must be a positive whole number, got {getattr(self, name)!r}")
        if self.workers < 0:
            raise ValueError(f"EvalOptions.workers must be 0 (this process) or more, got {self.workers}")


@dataclass
class _Accumulators:
    psnr: list[Tensor] = field(default_factory=list)
    ssim: list[Tensor] = field(default_factory=list)
    lpips: dict[str, list[Tensor]] = field(default_factory=dict)
    real: fidlib.RunningStats = field(default_factory=fidlib.RunningStats)
    fake: fidlib.RunningStats = field(default_factory=fidlib.RunningStats)
    moments: RunningMoments = field(default_factory=RunningMoments)
    digest: int | None = 0  # fidlib.image_digest of the originals measured (None: unknown): checks caches
    encode_s: float = 0.0
    decode_s: float = 0.0
    timed_images: int = 0


def _codebook_tracker(model) -> tuple[CodebookUsage | None, int]:
    size = getattr(model.bottleneck, "codebook_size", None)
    if not size:
        return None, 1
    b = model.config.bottleneck
    segments = b.segments if b.segments > 1 else 1
    parallel = segments * max(b.groups, 1) * max(b.residual_levels, 1)
    if b.kind == "lfq":
        parallel *= b.lfq_groups  # each of WeTok's groups codes its own 2^(D/g) codes
    return CodebookUsage(size, parallel), segments


def tokenizer_cost(model: "Tokenizer", image_size: int, device: torch.device) -> dict[str, float]:
    """Encoder and decoder cost of one image, counted with ``FlopCounterMode`` (2 FLOPs per MAC).

    Blocks run as :func:`softvq.networks.vit.reference_math` while counting: the counter has no
    formula for the CPU fused SDPA kernel (it would leave out QKᵀ and AV, about 12% of a ViT-S
    pass) nor for the in-place GEMM of the fused residual update.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from softvq.networks.vit import reference_math

    x = torch.zeros(1, model.config.in_channels, image_size, image_size, device=device)
    with reference_math(model), torch.inference_mode():
        with FlopCounterMode(display=False) as enc:
            latents = model.encode(x).latents
        with FlopCounterMode(display=False) as dec:
            model.decode(latents, image_size)
    e, d = enc.get_total_flops(), dec.get_total_flops()
    return {"encoder_gflops": e / 1e9, "decoder_gflops": d / 1e9,
            "encoder_gmacs": e / 2e9, "decoder_gmacs": d / 2e9}


def _load_lpips(nets: Sequence[str], device: torch.device) -> tuple[dict[str, Any], list[str]]:
    modules, notes = {}, []
    for net in nets:
        try:
            from softvq.losses.lpips import LPIPS
        except ImportError as exc:
            notes.append(f"LPIPS skipped: softvq.losses.lpips is unavailable ({exc})")
            break
        try:
            modules[net] = LPIPS(net=net).to(device).eval()
        except (FileNotFoundError, ImportError, ValueError, RuntimeError) as exc:
            notes.append(f"LPIPS-{net} skipped: its weights could not be loaded ({exc})")
    return modules, notes


def protocol_of(options: EvalOptions, image_size: int, num_images: int, fid_weights: str | None) -> dict[str, Any]:
    """The part of the protocol that decides the reference statistics (hashed into the cache key)."""
    return {
        "num_images": num_images, "image_size": image_size, "crop": CENTER_CROP,
        "resize": "box halvings, then PIL bicubic", "order": "sorted path / shard then member order",
        "quantization": "uint8", "fid_resize": f"bilinear to 299, {options.fid_resize}",
        "fid_normalization": options.fid_normalization, "fid_weights": fid_weights,
    }


def _reference_cache(options: EvalOptions, checksum: str) -> Path | None:
    if options.reference_stats:
        return Path(options.reference_stats).expanduser()
    if options.cache_dir:
        return Path(options.cache_dir).expanduser() / f"{checksum[:24]}.npz"
    return None


def _evaluation_identity(model, refs: list, file_entries: list[str], size: int,
                         options: EvalOptions) -> dict[str, Any]:
    """What an evaluation's running sums depend on: a resumed run must match it exactly. The image
    files are known by name, size and modification time (``fid.file_entries``, as the FID cache
    key): an image replaced after the sums began is not mixed in."""
    images = listing_sha1(ref.name for ref in refs)
    stats = fidlib.entries_checksum(file_entries, {})
    return {"weights_sha1": weights_sha1(model), "precision": model.precision, "images": len(refs),
            "images_sha1": images, "image_files_sha256": stats[:16], "image_size": size,
            "batch_size": options.batch_size, "fid": options.fid,
            "fid_weights": options.fid_weights, "fid_normalization": options.fid_normalization,
            "fid_resize": options.fid_resize, "crop": CENTER_CROP,
            "lpips_nets": list(options.lpips_nets)}


@torch.inference_mode()
@images_from_softvq_loaders()
def evaluate_tokenizer(model: "Tokenizer", source: str | Path, options: EvalOptions | None = None, *,
                       device: str | torch.device = "cpu", model_name: str | None = None,
                       state_file: str | Path | None = None, save_every_s: float = 300.0,
                       keep_state: bool = False) -> dict[str, Any]:
    """Run the protocol (module docstring) and return the report as a JSON-ready dict.

    ``state_file``: where the running sums are saved every ``save_every_s`` seconds, and read back
    to continue an interrupted evaluation of the same weights, images and options (a different
    one is refused by name); it is removed once the report is complete, unless ``keep_state``:
    then it holds the finished report, which the same call returns at once, until the caller
    removes it (``softvq eval --probe`` does, once the probe too is done). ``model`` is moved to
    ``device`` and evaluated in eval mode, then given back in the mode it came in.
    """
    options = options or EvalOptions()
    if not isinstance(options, EvalOptions):
        raise TypeError(f"options must be an EvalOptions, got {type(options).__name__}; e.g. EvalOptions(num_images=500)")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "encode"):
        raise TypeError(f"model must be a softvq.Tokenizer, got {type(model).__name__}; load a folder with "
                        f"softvq.Tokenizer.from_pretrained")
    device = torch.device(device)
    with evaluating(model.to(device)):  # the caller's model comes back in the mode it was given
        return _evaluate_tokenizer(model, source, options, device, model_name, state_file, save_every_s, keep_state)


def _evaluate_tokenizer(model: "Tokenizer", source: str | Path, options: EvalOptions, device: torch.device,
                        model_name: str | None, state_file: str | Path | None, save_every_s: float,
                        keep_state: bool = False) -> dict[str, Any]:
    from tqdm.auto import tqdm

    size = options.image_size or model.config.image_size
    patch = model.config.patch_size
    if size % patch:  # before any image is read; the tokenizer's own message would suggest a --resize eval lacks
        nearest = sorted({size // patch * patch or patch, (size // patch + 1) * patch})
        raise ValueError(f"image size {size} is not a multiple of the model's patch size {patch}: evaluate at "
                         f"{' or '.join(map(str, nearest))} (--image-size)")
    refs, files, root = list_image_refs(source, options.num_images)
    n = len(refs)
    notes: list[str] = []
    if n < options.num_images:
        notes.append(f"only {n} images available (asked for {options.num_images})")

    extractor, ref_stats, cache_path, checksum, cached_digest = None, None, None, None, None
    # one stat per file, shared by the FID cache key and the resume key
    entries = fidlib.file_entries(files, root) if options.fid or state_file is not None else []
    if options.fid:
        from softvq.evaluation.inception import InceptionFeatureExtractor

        extractor = InceptionFeatureExtractor(options.fid_weights, device=device,
                                              batch_size=options.batch_size,
                                              normalization=options.fid_normalization,
                                              resize=options.fid_resize)
        weights_name = extractor.weights_name
        protocol = protocol_of(options, size, n, weights_name)
        checksum = fidlib.entries_checksum(entries, protocol)
        cache_path = _reference_cache(options, checksum)
        if cache_path is not None and cache_path.exists():
            ref_stats = fidlib.load_reference_stats(cache_path, checksum)
            cached_digest = fidlib.load_reference_digest(cache_path)
            notes.append(f"reference statistics loaded from {cache_path}")
        if n < 2:
            raise ValueError(f"rFID needs at least 2 images, the source has {n}")

    lpips, lpips_notes = _load_lpips(options.lpips_nets, device)
    notes += lpips_notes
    usage, segments = _codebook_tracker(model)
    acc = _Accumulators(lpips={net: [] for net in lpips})

    skipped: list[str] = []
    evaluated = done_batches = 0
    state_file = Path(state_file).expanduser() if state_file is not None else None
    identity = _evaluation_identity(model, refs, entries, size, options) if state_file else {}
    saved = load_saved_state(state_file, identity)
    if saved is not None and "report" in saved:  # finished, kept for a caller that was stopped later
        if not keep_state:
            assert state_file is not None  # load_saved_state read it
            state_file.unlink(missing_ok=True)
        return {**saved["report"], "notes": [*saved["report"]["notes"],
                                             "the evaluation had finished before the run was stopped; its report "
                                             "was kept"]}
    real_pass = False  # the originals' statistics need a pass of their own at the end
    if saved is not None:
        # the saved sums relied on cached statistics that are gone now (another cache key, say)
        real_pass = saved["acc"].real.count == 0 and saved["evaluated"] and extractor is not None and ref_stats is None
        acc, usage, skipped, evaluated, done_batches = (saved["acc"], saved["usage"], saved["skipped"],
                                                        saved["evaluated"], saved["batches"])
        if "digest" not in vars(acc):  # sums saved before the digest existed: it is unknown
            acc.digest = None
        notes.append(f"continued an interrupted evaluation after {evaluated + len(skipped)} images "
                     f"(throughput: this process's batches only)")
    loop_notes = len(notes)  # notes from here on belong to the running sums and are saved with them
    if saved is not None:
        notes += saved["notes"]
    # every image before this point was summed or skipped (a batch with no readable image is never
    # yielded, so counting batches would not do)
    consumed = evaluated + len(skipped)
    bar = tqdm(total=n, initial=consumed, unit="img", desc="eval", disable=not options.progress)
    remaining = refs[consumed:]
    batches = readable_batches(remaining, size, options.batch_size, options.workers, skipped,
                               require_readable=saved is None)
    skipped_done = len(skipped)  # the loader may already have named the next batch's unreadable files

    def save() -> None:
        assert state_file is not None  # KeptWork saves only with a state file
        save_state(state_file, {"identity": identity, "acc": acc, "usage": usage,
                                      "skipped": skipped[:skipped_done], "evaluated": evaluated,
                                      "batches": done_batches, "notes": notes[loop_notes:]})

    kept = KeptWork(state_file, save, save_every_s, batches)
    with kept.kept_when_stopped(lambda: f"the sums of {evaluated} images" if done_batches else None):
        for i, batch_u8 in enumerate(batches):
            x = uint8_to_model(batch_u8).to(device)
            t0 = time.perf_counter()
            enc = model.encode(x)
            _sync(device)
            t1 = time.perf_counter()
            rec = model.decode(enc.latents, size)
            _sync(device)
            t2 = time.perf_counter()
            rec_u8 = quantize_to_uint8(rec)
            rec_float = uint8_to_model(rec_u8)
            lpips_values = {net: module(x, rec_float).float().cpu() for net, module in lpips.items()}
            fake_features = extractor(rec_u8) if extractor is not None else None
            real_features = extractor(batch_u8) if extractor is not None and ref_stats is None else None
            # the updates, after every network has run; a stop in them would keep part of a batch
            kept.updating = True
            if i > 0 or n <= options.batch_size:  # the first of several batches pays one-off warm-up costs
                acc.encode_s += t1 - t0
                acc.decode_s += t2 - t1
                acc.timed_images += len(x)
            acc.psnr.append(psnr(batch_u8.double(), rec_u8.cpu().double(), data_range=255))
            acc.ssim.append(ssim(batch_u8.double(), rec_u8.cpu().double(), data_range=255))
            for net, values in lpips_values.items():
                acc.lpips[net].append(values)
            if fake_features is not None:
                acc.fake.update(fake_features)
            if real_features is not None:
                acc.real.update(real_features)
            if usage is not None and enc.indices is not None:
                try:
                    usage.update(codebook_rows(enc.indices, segments))
                    if enc.probs is not None and enc.probs.shape[-1] == usage.codebook_size:
                        usage.update_probs(probs_rows(enc.probs, segments))
                except ValueError as exc:  # an index layout this tracker does not know: report, go on
                    notes.append(f"codebook usage skipped: {exc}")
                    usage = None
            acc.moments.update(enc.latents)
            if extractor is not None and acc.digest is not None:
                acc.digest = (acc.digest + fidlib.image_digest(batch_u8)) % (1 << 128)
            evaluated += len(x)
            done_batches += 1
            skipped_done = len(skipped)
            kept.updating = False
            bar.update(len(x))
            kept.tick()
    bar.close()
    if skipped:
        notes.append(skipped_note(skipped, n))
    if extractor is not None and evaluated < 2:
        raise ValueError(f"rFID needs at least 2 readable images, {source} has {evaluated}")

    report: dict[str, Any] = {
        "model": model_name or model.source,
        "weights_sha1": identity.get("weights_sha1") or weights_sha1(model),  # which weights, however spelled
        "source": str(source),
        "num_images": evaluated,
        "skipped_images": len(skipped),
        "image_size": size,
        "num_tokens": model.config.num_tokens,
        "latent_dim": model.latent_dim,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "device": str(device),
        "compute_precision": model.precision,
        "batch_size": options.batch_size,
        "psnr": _mean(acc.psnr),
        "ssim": _mean(acc.ssim),
    }
    for net, values in acc.lpips.items():
        report[f"lpips_{net}"] = _mean(values)
    if extractor is not None:
        assert checksum is not None  # computed with the extractor
        report["rfid"] = _rfid(extractor, acc, refs, size, options, evaluated, notes, checksum=checksum,
                               cache_path=cache_path, ref_stats=ref_stats, cached_digest=cached_digest,
                               real_pass=real_pass, protocol=protocol_of(options, size, n, weights_name))
        report["fid_reference_checksum"] = checksum
        if evaluated < 10_000:
            notes.append(f"rFID on {evaluated} images is biased upwards; the paper uses {PAPER_NUM_IMAGES}")
    if usage is not None:
        report.update(usage.summary())
        report["codebook_counts"] = usage.counts.tolist()  # (codebooks, K): for `softvq plot`
    report.update(acc.moments.summary())
    if acc.timed_images:
        report["encode_images_per_s"] = acc.timed_images / max(acc.encode_s, 1e-12)
        report["decode_images_per_s"] = acc.timed_images / max(acc.decode_s, 1e-12)
    if options.count_flops:
        report.update(tokenizer_cost(model, size, device))
        report["flops_convention"] = "GMACs = multiply-accumulates; GFLOPs = 2 x GMACs (torch.utils.flop_counter)"
    report["protocol"] = protocol_of(options, size, n, weights_name if extractor is not None else None)
    report["notes"] = notes
    if state_file is not None and keep_state:
        save_state(state_file, {"identity": identity, "report": report})
    elif state_file is not None:
        state_file.unlink(missing_ok=True)
    return report


def _rfid(extractor: Any, acc: _Accumulators, refs: list, size: int, options: EvalOptions, evaluated: int,
          notes: list[str], *, checksum: str, cache_path: Path | None, ref_stats: Any, cached_digest: int | None,
          real_pass: bool, protocol: dict[str, Any]) -> float:
    """rFID of the summed reconstructions against the originals' statistics: the cached ones where
    they are those of the images just measured, else the running sums' or a pass of their own (and
    cached then). What happened is added to ``notes``."""
    if ref_stats is not None:
        assert cache_path is not None  # ref_stats were loaded from it
        stale = _stale_reference(cache_path, ref_stats.count, cached_digest, evaluated, acc.digest)
        if stale:
            logging.getLogger(__name__).warning(stale)  # the CLI prints it as "softvq: warning: ..."
            notes[notes.index(f"reference statistics loaded from {cache_path}")] = stale
            acc.real, digest = _real_features(extractor, refs, size, options)
            ref_stats = None
            if acc.real.count != evaluated or acc.digest not in (None, digest):
                cache_path = None  # statistics of neither the images measured nor those on disk now
                notes.append(f"the images changed during the evaluation: {evaluated} were measured, "
                             f"{acc.real.count} read again for the reference statistics (other pixels, or "
                             f"other files readable); rerun it")
    elif real_pass:
        notes.append("the saved sums relied on cached reference statistics that are gone: the originals' "
                     "statistics were computed in a pass of their own")
        acc.real, acc.digest = _real_features(extractor, refs, size, options)
    if ref_stats is None:
        ref_stats = acc.real.finalize()
        if cache_path is not None:
            fidlib.save_reference_stats(cache_path, ref_stats, checksum, protocol, digest=acc.digest)
            notes.append(f"reference statistics cached in {cache_path}")
    return fidlib.frechet_distance(ref_stats, acc.fake.finalize())


def _stale_reference(cache_path: Path, count: int, cached_digest: int | None, evaluated: int,
                     digest: int | None) -> str | None:
    """Why cached reference statistics are not those of the images just measured (None: they are)."""
    if count != evaluated:
        return (f"{cache_path} holds the statistics of {count} images, but {evaluated} of the same files were "
                f"readable now: the rFID would compare other sets, so the originals' statistics were computed "
                f"again in a second pass")
    if None not in (cached_digest, digest) and cached_digest != digest:
        return (f"{cache_path} was made from other pixels than the {evaluated} images measured now (same names, "
                f"sizes and modification times, other content): the originals' statistics were computed again "
                f"in a second pass")
    return None


def _real_features(extractor, refs: list, size: int, options: EvalOptions) -> tuple[fidlib.RunningStats, int]:
    """The originals' Inception statistics in a pass of their own (unreadable images skipped), and
    the :func:`fidlib.image_digest` of the images read."""
    from tqdm.auto import tqdm

    skipped: list[str] = []
    real, digest = fidlib.RunningStats(), 0
    bar = tqdm(total=len(refs), unit="img", desc="reference", disable=not options.progress)
    for batch in readable_batches(refs, size, options.batch_size, options.workers, skipped):
        real.update(extractor(batch))
        digest = (digest + fidlib.image_digest(batch)) % (1 << 128)
        bar.update(real.count + len(skipped) - bar.n)
    bar.close()
    return real, digest


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mean(values: list[Tensor]) -> float:
    return float(torch.cat(values).double().mean()) if values else math.nan


