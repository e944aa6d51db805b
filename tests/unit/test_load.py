"""Loading: aliases, tiny models, local directories, and the errors that say what to do."""

from __future__ import annotations

import pytest
import torch

import mechscope as ms
from mechscope.models import SOURCES, UnsupportedArchitectureError
from mechscope.models.adapters import adapter_for, adapters


def test_every_registered_family_has_a_tiny_model():
    for family in adapters():
        model = ms.load_model(f"tiny-{family}")
        assert model.cfg.family == family and model.hook_names[0] == "hook_embed"
        assert not any(p.requires_grad for p in model.hf_model.parameters())


def test_local_directory_round_trip(tmp_path):
    model = ms.load_model("tiny-gpt2")
    model.hf_model.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    again = ms.load_model(str(tmp_path), dtype="float64")
    tokens = model.to_tokens("round trip")
    assert again.dtype == torch.float64
    torch.testing.assert_close(again(tokens).float(), model(tokens))


def test_unknown_names_say_what_exists():
    with pytest.raises(ms.models.ModelNotAvailableError, match="smollm2-135m"):
        ms.load_model("no-such-model")
    with pytest.raises(ms.models.ModelNotAvailableError, match="tiny-llama"):
        ms.load_model("tiny-nonexistent")
    with pytest.raises(FileNotFoundError):
        ms.load_model("/nowhere/model.gguf")


def test_missing_package_error_has_the_install_command(monkeypatch):
    import mechscope.models.sources as sources

    monkeypatch.setattr(sources, "_package_dir", lambda package: None)
    monkeypatch.setenv("MECHSCOPE_CACHE", "/nonexistent-cache")
    for alias, source in SOURCES.items():
        assert not source.available()
        with pytest.raises(ms.models.ModelNotAvailableError, match="pip install"):
            ms.load_model(alias)


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import BertConfig

    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*llama"):
        adapter_for(BertConfig())


def _fake_gguf(tmp_path, monkeypatch):
    """A ``.gguf`` path whose "dequantisation" returns tiny-llama, so the conversion cache runs in a second."""
    import mechscope.models.load as load

    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    tiny_model, tiny_tokenizer = load._tiny("llama")
    real_model, real_tokenizer = load.AutoModelForCausalLM.from_pretrained, load.AutoTokenizer.from_pretrained
    monkeypatch.setattr(
        load.AutoModelForCausalLM,
        "from_pretrained",
        lambda where, gguf_file=None, **kw: tiny_model if gguf_file else real_model(where, **kw),
    )
    monkeypatch.setattr(
        load.AutoTokenizer,
        "from_pretrained",
        lambda where, gguf_file=None, **kw: tiny_tokenizer if gguf_file else real_tokenizer(where, **kw),
    )
    return gguf, tiny_model


def test_gguf_conversion_that_cannot_be_cached_still_loads(tmp_path, monkeypatch):
    gguf, dequantised = _fake_gguf(tmp_path, monkeypatch)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dequantised, "save_pretrained", disk_full)
    model = ms.load_model(str(gguf))
    assert model.hf_model is dequantised
    converted = tmp_path / "cache" / "converted"
    assert not converted.exists() or not any(converted.iterdir())  # no half-written directory left
