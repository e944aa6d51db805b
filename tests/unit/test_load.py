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
