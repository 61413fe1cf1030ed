"""``softvq info``: parameter counts, tokens and compression ratio; ``--save`` converts a release."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from softvq import PRESETS, Tokenizer
from softvq.checkpoint.official import load_official
from softvq.checkpoint.pretrained import CheckpointError, load_pretrained
from softvq.cli.info import _bottleneck_line, architecture, describe, presets_table
from softvq.cli.main import main
from softvq.config import BottleneckConfig, TokenizerConfig, preset

sys.path.insert(0, str(Path(__file__).parent))
from test_checkpoint_official import tiny_release  # noqa: E402  (the release-layout fixture)


def _field(out: str, name: str) -> str:
    match = re.search(rf"^{re.escape(name)}\s+(.+)$", out, re.M)
    assert match, out
    return match.group(1)


def test_info_on_a_preset(capsys):
    assert main(["info", "softvq-tiny"]) == 0
    out = capsys.readouterr().out
    model = Tokenizer.from_preset("softvq-tiny")
    total = int(_field(out, "params total").split("(")[1].rstrip(")").replace(",", ""))
    assert total == model.num_parameters()
    enc = int(_field(out, "params encoder").split("(")[1].rstrip(")").replace(",", ""))
    assert enc == sum(p.numel() for m in (model.encoder, model.to_latent) for p in m.parameters())
    assert _field(out, "latents (L x D)") == "16 x 8"
    # 64*64*3*8 image bits over 16*8 floats: 98304 / 4096 = 24 at 32-bit, 48 at 16-bit.
    assert _field(out, "compression") == "24.0x at 32-bit, 48.0x at 16-bit"
    assert _field(out, "pixels per token") == "256"
    assert "architecture only" in out


def test_info_without_spec_lists_every_preset_and_explains_the_columns(capsys):
    assert main(["info"]) == 0
    table, legend = capsys.readouterr().out.strip().split("\n\n")
    lines = table.splitlines()
    assert lines[0].split()[0] == "preset" and len(lines) == 1 + len(PRESETS)
    row = next(line.split() for line in lines if line.startswith("softvq-s-64 "))
    # 256*256*3*8 / (64*32*32) = 24; 256*256/64 = 1024 pixels per token
    assert row[3:6] == ["64", "32", "8192"] and row[-3:] == ["24.0", "48.0", "1024"]
    # every column that is not a plain word is explained; x codes only appears with discrete rows
    explained = [line.split(":")[0] for line in legend.splitlines()]
    assert explained == ["K", "x 32-bit, x 16-bit", "px/token"]
    assert "per codebook" in legend and "x codes" not in lines[0]


def _with_bottleneck(**bottleneck) -> TokenizerConfig:
    config = preset("softvq-tiny")
    config.bottleneck = BottleneckConfig(**bottleneck)
    return config.validate()


def test_lfq_and_vq_compress_to_their_code_bits(tmp_path, capsys):
    # LFQ latents are signs: 16 tokens x 8 channels = 128 bits, not 16*8 floats; 98304 / 128 = 768
    Tokenizer(_with_bottleneck(kind="lfq", latent_dim=8, lfq_groups=2)).save_pretrained(tmp_path / "lfq")
    assert main(["info", str(tmp_path / "lfq")]) == 0
    out = capsys.readouterr().out
    assert _field(out, "bottleneck") == "lfq, 2 groups of 4 sign channels (2^4 = 16 implicit codes each; 2^8 per token)"
    assert _field(out, "latent bits").startswith("128 (L*D = 16 x 8 sign bits")
    assert _field(out, "compression") == "768.0x (code bits)"
    # channel groups of LFQ groups: 4 groups of 2 signs; segments share LFQ's fixed codes
    line = _bottleneck_line(architecture(_with_bottleneck(kind="lfq", latent_dim=8, groups=2, lfq_groups=2)))
    assert line.startswith("lfq, 4 groups of 2 sign channels (2^2 = 4 implicit codes each; 2^8 per token)")
    line = _bottleneck_line(architecture(_with_bottleneck(kind="lfq", latent_dim=8, lfq_groups=8)))
    assert line.startswith("lfq, 8 groups of 1 sign channel (2^1 = 2 implicit codes each")  # was "1 sign channels"
    line = _bottleneck_line(architecture(_with_bottleneck(kind="lfq", latent_dim=1)))
    assert line.startswith("lfq, 1 sign channel (2^1 = 2 implicit codes)")
    line = _bottleneck_line(architecture(_with_bottleneck(kind="lfq", latent_dim=8, segments=4)))
    assert "codewords" not in line and "codebooks (release)" not in line and "no extra codebooks" in line
    # VQ: one index of log2 K bits per channel group: 16 x 2 x 8 = 256 bits
    vq = describe(architecture(_with_bottleneck(kind="vq", latent_dim=8, codebook_size=256, groups=2)), "vq")
    assert _field(vq, "latent bits").startswith("256 (L x 2 code indices per token, log2 K = 8 bits each)")
    assert _field(vq, "compression") == "384.0x (code bits)"


def test_the_overview_gives_discrete_rows_their_code_compression():
    configs = {"lfq": _with_bottleneck(kind="lfq", latent_dim=8, lfq_groups=2), "tiny": preset("softvq-tiny"),
               "vq": _with_bottleneck(kind="vq", latent_dim=8, codebook_size=1024)}
    table, legend = presets_table(configs).split("\n\n")
    header, *rows = table.splitlines()
    assert "x codes" in header
    cells = {row.split()[0]: row.split() for row in rows}
    # K is per LFQ group (2^4); floats give no honest size for discrete rows
    assert cells["lfq"][5] == "16" and cells["lfq"][-4:] == ["-", "-", "768.0", "256"]
    assert cells["vq"][-4:] == ["-", "-", f"{98304 / (16 * 10):.1f}", "256"]
    assert cells["tiny"][-4:] == ["24.0", "48.0", "-", "256"]
    assert "x codes:" in legend


def test_info_on_a_release_lists_ignored_keys_and_saves_our_format(tmp_path, capsys):
    folder, _, _ = tiny_release(tmp_path, 1)
    out_dir = tmp_path / "converted"
    assert main(["info", f"official:{folder}", "--save", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "quantize.codebook_used" in out and "decoder.model.patch_embed.* (2 keys)" in out
    assert _field(out, "latent mean / std") == "0.25 / 1.75"
    a, b = load_official(folder).state_dict(), load_pretrained(out_dir).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_training_run_folder_stands_for_its_export_and_an_unfinished_run_is_named(tmp_path, capsys):
    run = tmp_path / "run"
    torch.manual_seed(0)
    Tokenizer.from_preset("softvq-tiny", num_tokens=12).save_pretrained(run / "export")
    (run / "config.yaml").write_text("model: {preset: softvq-tiny}\n")
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert _field(out, "model") == f"softvq checkpoint {run / 'export'}" and _field(out, "latents (L x D)") == "12 x 8"
    with pytest.raises(CheckpointError, match="is a training run; its softvq checkpoint is .*export"):
        Tokenizer.from_pretrained(run)  # the Python API names the export instead of loading it
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text("model: {preset: softvq-tiny}\n")
    assert main(["info", str(tmp_path / "unfinished")]) == 2
    assert "is a training run without an export/ yet" in capsys.readouterr().err


def test_a_reader_that_leaves_early_ends_the_output_quietly():
    # `softvq info | head`: the pipe is closed before softvq writes (it is still importing torch)
    proc = subprocess.Popen([sys.executable, "-m", "softvq.cli.main", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""  # no BrokenPipeError traceback


def test_info_checks_a_training_config_whole_and_describes_its_model_without_training(tmp_path, capsys,
                                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["info", "ablation-gmmvq"]) == 0  # GMMVQ on the meta device read its τ buffer: .item() failed
    out = capsys.readouterr().out
    assert "config ablation-gmmvq (architecture only; every setting valid)" in out and "gmmvq" in out
    assert "training: 250000 steps at batch 256" in out
    assert main(["info", "demo", "model.num_tokens=32", "model.bottleneck.latent_dim=4"]) == 0
    assert re.search(r"latents \(L x D\)\s+32 x 4", capsys.readouterr().out)
    # a setting train would refuse is refused here, before any run folder or training
    assert main(["info", "demo", "optim.lr=.inf"]) == 2
    assert "optim.lr must be a finite number, got inf" in capsys.readouterr().err
    assert main(["info", "ablation-pq4", "--save", str(tmp_path / "x")]) == 2
    assert "a training config has none" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_info_save_refuses_a_folder_of_another_kind_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import softvq.cli.info as info_module

    latents = tmp_path / "latents"  # an interrupted pretokenize: the convert would have mixed with its shards
    latents.mkdir()
    (latents / "progress.json").write_text("{}")
    loaded = []
    monkeypatch.setattr(info_module, "load_tokenizer", lambda *args, **kwargs: loaded.append(args))
    assert main(["info", "softvq-tiny", "--save", str(latents)]) == 2
    assert "holds an interrupted pretokenize's latent set; writing a softvq-tokenizer" in capsys.readouterr().err
    assert loaded == [] and sorted(p.name for p in latents.iterdir()) == ["progress.json"]


def test_info_names_the_release_forms_of_a_wetok_config(capsys):
    assert main(["info", "wetok-gd-s-64-release"]) == 0
    out = capsys.readouterr().out
    assert "entropy pooled over the groups (the released GFQ)" in out and "; frozen: encoder, bottleneck" in out
    assert main(["info", "wetok-gq-s-64"]) == 0  # the paper's form says nothing extra
    out = capsys.readouterr().out
    assert "pooled" not in out and "frozen" not in out


def _vq(**bottleneck):
    from softvq.cli.info import architecture, describe

    config = preset("softvq-tiny")
    config.bottleneck = BottleneckConfig(kind="vq", latent_dim=8, **bottleneck)
    return describe(architecture(config.validate()), "vq")


def test_residual_levels_multiply_the_code_bits():
    """Residual levels multiply a VQ's code bits."""
    out = _vq(codebook_size=256, residual_levels=2)  # 16 tokens x 2 levels x 8 bits = 256; 98304 / 256 = 384
    assert _field(out, "latent bits").startswith("256 (L x 2 code indices per token, log2 K = 8 bits each)")
    assert _field(out, "compression") == "384.0x (code bits)"


def test_a_fractional_bit_count_keeps_its_tenth():
    """A code of a fractional bit count (K not a power of two) keeps a tenth of a bit."""
    out = _vq(codebook_size=1000)  # 16 x log2(1000) = 159.45 bits
    assert _field(out, "latent bits").startswith("159.5 (")
    assert _field(out, "compression") == "616.5x (code bits)"


def test_one_code_index_per_token_is_singular():
    """One code index per token is said in the singular."""
    assert _field(_vq(codebook_size=256), "latent bits") == \
        "128 (L x 1 code index per token, log2 K = 8 bits each)"


def test_the_image_row_counts_the_image_tokens(capsys):
    """The image row counts (image / patch)^2 image tokens."""
    assert main(["info", "softvq-tiny"]) == 0
    config = preset("softvq-tiny")
    assert _field(capsys.readouterr().out, "image") == \
        f"64x64 px, patch {config.patch_size} -> {config.num_patches} image tokens"
    assert config.num_patches == (64 // config.patch_size) ** 2


def test_a_checkpoint_folder_named_like_a_bundled_config_is_described_as_a_checkpoint(tmp_path, monkeypatch, capsys):
    """A checkpoint folder that has a bundled config's name is described as the checkpoint."""
    from softvq import Tokenizer
    from softvq.cli.info import is_training_config

    monkeypatch.chdir(tmp_path)
    assert is_training_config("demo")  # the bundled config, while no folder has its name
    Tokenizer.from_preset("softvq-tiny", num_tokens=12).save_pretrained("demo")
    assert not is_training_config("demo")
    assert main(["info", "demo"]) == 0
    out = capsys.readouterr().out
    assert _field(out, "model") == "softvq checkpoint demo" and _field(out, "latents (L x D)") == "12 x 8"
