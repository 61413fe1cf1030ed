"""README.md's ```python blocks, run as written except for a few explicit textual substitutions
that shrink them to CPU test size (tiny presets, a handful of steps, no worker processes).

Each substitution is an exact ``str.replace`` whose old text must be in the block: when the README
changes, the test fails naming the text it no longer finds, instead of silently running something
else. Everything the blocks read (an exported tokenizer, a released checkpoint, an image folder) is
made beforehand in ``tmp_path``, and each block's products are checked after it ran.
"""

from __future__ import annotations

import ast
import builtins
import json
import re
from pathlib import Path

import pytest
import torch

from softvq import Tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)

# The tokenizer run folder's model: the demo config's softvq-tiny (64 px, 16 tokens x 8 channels),
# one block deep; the rest of the overrides make a run of a few seconds with a 2-image held-out set.
TINY_TRAINING = ('"schedule.steps={steps}", "model.encoder.depth=1", "model.decoder.depth=1", '
                 '"schedule.batch_size=4", "schedule.warmup_steps=1", "data.num_eval_images=2", '
                 '"run.log_every=1", "run.checkpoint_every=1000", "run.grid_every=0", "run.progress=false"')

SUBSTITUTIONS: dict[int, list[tuple[str, str]]] = {
    # (1) the Tokenizer API
    1: [
        ('from_preset("softvq-s-64")', 'from_preset("softvq-tiny")'),
        # the hub id -> a folder in the release's layout (tiny widths, 32 px: tiny_release below)
        ('from_official("SoftVQVAE/softvq-l-64")', "from_official(RELEASE)"),
        # the trained size of the tokenizer last loaded, the released stand-in's 32 px
        ("torch.rand(4, 3, 256, 256)", "torch.rand(4, 3, 32, 32)"),
    ],
    # (2) training through the Python API
    2: [
        ('"schedule.steps=2000"]', TINY_TRAINING.format(steps=2) + "]"),
        ('["schedule.steps=4000"]', '["schedule.steps=3"]'),
    ],
    # (3) the generation pipeline
    3: [
        ("workers=8", "workers=0"),
        ('size="B",', 'size="S", width=32, depth=1, heads=2,'),  # the smallest size, made tiny
        ("steps=400_000", "steps=2"),
    ],
}


def readme_blocks() -> list[tuple[int, str]]:
    """(line of the block's first code line, code) of every ```python block in README.md."""
    text = README.read_text(encoding="utf-8")
    blocks = [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in PYTHON_BLOCK.finditer(text)]
    lines = [line for line, _ in blocks]
    assert len(blocks) == 3, (
        f"README.md has {len(blocks)} ```python blocks (at lines {lines}), expected exactly 3: the Tokenizer "
        f"API, training from Python, the generation pipeline; update tests/test_readme_snippets.py to match")
    return blocks


def shrunk(number: int) -> tuple[int, str]:
    line, code = readme_blocks()[number - 1]
    for old, new in SUBSTITUTIONS[number]:
        assert "\n" not in old + new  # one line per line: tracebacks keep README.md's line numbers
        assert old in code, (f"README.md's python block {number} (code from line {line}) no longer contains "
                             f"{old!r}, which tests/test_readme_snippets.py replaces by {new!r}: update the "
                             f"substitution")
        code = code.replace(old, new)
    return line, code


def run_block(number: int, **given) -> dict:
    """Exec block ``number`` in a fresh namespace (plus ``given``), with README.md's line numbers in
    tracebacks (the substitutions keep one line per line)."""
    line, code = shrunk(number)
    namespace = {"__name__": f"readme_block_{number}", **given}
    exec(compile("\n" * (line - 1) + code, str(README), "exec"), namespace)
    return namespace


def image_folder(root: Path, classes=("photos-a", "photos-b"), per_class: int = 5, size: int = 64) -> Path:
    """``root`` with one sub-folder per class of ``per_class`` PNG crops of the photos bundled with
    scikit-image / scikit-learn, each a different photo."""
    from softvq.data.images import bundled_photos, center_crop_resize, load_rgb

    photos = bundled_photos()
    assert len(photos) >= len(classes) * per_class
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            center_crop_resize(load_rgb(photos[c * per_class + i]), size).save(root / name / f"{i}.png")
    return root


def free_names(code: str) -> list[str]:
    """Names a block reads but neither imports nor assigns (nor are builtins)."""
    bound, used = set(dir(builtins)), set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return sorted(used - bound)


@pytest.mark.parametrize("number", [1, 2, 3])
def test_blocks_import_what_they_use(number):
    """Each block runs pasted alone (the generation block once used softvq without importing it)."""
    line, code = readme_blocks()[number - 1]
    assert free_names(code) == [], (f"README.md's python block {number} (code from line {line}) uses names "
                                    f"it never defines")


# --- (1) the Tokenizer API --------------------------------------------------------------------------


def test_tokenizer_api_block(tmp_path, monkeypatch):
    from test_checkpoint_official import tiny_release  # a folder in the released checkpoints' layout

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    Tokenizer.from_preset("softvq-tiny").save_pretrained("runs/demo/export")
    release, _, _ = tiny_release(tmp_path, 4)  # 4 sequence-segment codebooks, as released; 32 px, 8 x 4 latents

    ns = run_block(1, RELEASE=str(release))

    tok, enc, z, recon, images = ns["tok"], ns["enc"], ns["z"], ns["recon"], ns["images"]
    assert tok.config.image_size == 32 and tok.config.bottleneck.segments == 4  # the last one loaded: the release
    assert (tok.config.num_tokens, tok.config.bottleneck.latent_dim, tok.config.bottleneck.codebook_size) == (8, 4, 16)
    assert images.shape == (4, 3, 32, 32)
    assert enc.latents.shape == (4, 8, 4) and enc.features.shape == (4, 8, 4)  # (B, L, D)
    assert enc.probs.shape == (4, 8, 16)  # (B, L, K)
    assert torch.equal(z, enc.latents)  # encode_latents gives encode's latents
    assert recon.shape == images.shape and recon.dtype == torch.float32 and bool(torch.isfinite(recon).all())
    assert tok.slice_size == 8 and tok.precision == "bf16"  # enable_slicing / enable_autocast took
    # save_pretrained wrote the model before those settings, and it loads back to the same latents
    saved = Tokenizer.from_pretrained("my-tokenizer")
    assert saved.config == tok.config
    with torch.inference_mode():
        assert torch.allclose(saved.encode_latents(images), z, atol=1e-5)


# --- (2) training from Python, then (3) generation on its latents -----------------------------------


def test_training_and_generation_blocks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image_folder(tmp_path / "my_images")  # 2 classes x 5 photos, 64 px
    torch.manual_seed(0)

    ns = run_block(2)

    run = tmp_path / "runs" / "mine"
    result = ns["result"]
    assert (result.status, result.step) == ("finished", 2) and result.metrics["psnr"] > 0
    assert ns["more"].schedule.steps == 3 and ns["more"].data.path == str(tmp_path / "my_images")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002.pt", "step-00000003.pt"]
    assert json.loads((run / "metrics.json").read_text())["step"] == 3  # the resumed run reached step 3
    assert (run / "export" / "config.json").is_file() and (run / "export" / "model.safetensors").is_file()
    tok = ns["tok"]
    assert isinstance(tok, Tokenizer) and tok.config.image_size == 64
    assert (tok.config.num_tokens, tok.config.bottleneck.latent_dim, tok.config.encoder.depth) == (16, 8, 1)

    ns = run_block(3)

    latents = json.loads((tmp_path / "runs" / "latents" / "meta.json").read_text())
    assert latents["count"] == 10 and latents["classes"] == ["photos-a", "photos-b"]
    assert latents["class_counts"] == [5, 5] and (latents["num_tokens"], latents["latent_dim"]) == (16, 8)
    assert latents["tokenizer"] == str(run / "export")
    assert (tmp_path / "runs" / "sit" / "generator" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "runs" / "sit" / "config.json").read_text())["train"]["steps"] == 2
    assert ns["meta"].classes == ["photos-a", "photos-b"] and ns["meta"].objective == "sit"
    samples = tmp_path / "runs" / "samples"
    assert sorted(p.name for p in (samples / "images").iterdir()) == [f"{i:06d}.png" for i in range(8)]
    assert (samples / "grid.png").is_file()
    record = json.loads((samples / "samples.json").read_text())
    assert record["finished"] and record["labels"] == [0] * 8
    assert (record["cfg"], record["interval"]) == (1.75, [0.0, 0.7])
    images = ns["images"]
    assert images.shape == (2, 3, 64, 64) and bool(torch.isfinite(images).all())
    assert not images.requires_grad  # decoded under inference_mode: no graph kept
