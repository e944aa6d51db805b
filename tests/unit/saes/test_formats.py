"""SAE formats: native round trips; SAELens and Gemma Scope files written here the way those projects
write them (key names, shapes, dtypes, cfg fields), imported and checked against their own encode /
decode formulas applied to the raw arrays; export then re-import; refusals of bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mechscope as ms
from mechscope.models.errors import UnknownHookError
from mechscope.saes.arch import KINDS, make_sae
from mechscope.saes.formats import FORMATS, detect_format, gemma_scope, load_sae, native, saelens, save_sae
from mechscope.saes.sae import IncompatibleSAEError, SAEConfig, SAEFormatError

D_IN, D_SAE, K = 16, 48, 6
HOOK = "blocks.0.hook_resid_post"


def _random_sae(kind: str, **over):
    over = {"hook_name": HOOK, **over}
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, kind=kind, k=K if "topk" in kind else None, **over)
    sae = make_sae(cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if kind == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.3)
        if kind == "batchtopk":
            sae.threshold.fill_(0.2)
        sae.input_scale.fill_(2.5)
        sae.output_scale.fill_(2.5 if not sae.cfg.is_transcoder else 0.6)
    return sae.eval()


def _x(n=10, d=D_IN) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(11))


# ---------------------------------------------------------------- SAELens' own formulas
def _saelens_encode(w: dict[str, torch.Tensor], cfg: dict, x: torch.Tensor) -> torch.Tensor:
    """SAELens 6 ``encode`` (and 4/5's) on the raw arrays: standard / topk / jumprelu / transcoders."""
    arch = cfg.get("architecture", "standard")
    fn = cfg.get("activation_fn_str", "relu")
    apply = cfg.get("apply_b_dec_to_input", True) and "transcoder" not in arch
    hidden = ((x - w["b_dec"]) if apply else x) @ w["W_enc"] + w["b_enc"]
    if arch == "topk" or fn == "topk":
        k = cfg.get("k") or cfg["activation_fn_kwargs"]["k"]
        if cfg.get("rescale_acts_by_decoder_norm"):
            hidden = hidden * w["W_dec"].norm(dim=-1)
        values, index = hidden.topk(k, dim=-1)
        return torch.zeros_like(hidden).scatter(-1, index, values.relu())
    if "jumprelu" in arch:
        threshold = w["threshold"] if "threshold" in w else w["log_threshold"].exp()
        return hidden.relu() * (hidden > threshold)
    return hidden.relu()


def _saelens_decode(w: dict[str, torch.Tensor], cfg: dict, acts: torch.Tensor) -> torch.Tensor:
    if cfg.get("rescale_acts_by_decoder_norm"):
        acts = acts / w["W_dec"].norm(dim=-1)
    if "scaling_factor" in w:  # 4.x/5.x finetuning scaling factor
        acts = acts * w["scaling_factor"]
    return acts @ w["W_dec"] + w["b_dec"]


def _write_saelens(root: Path, cfg: dict, weights: dict[str, torch.Tensor]) -> Path:
    """As SAELens' ``save_model`` does: ``save_file(state_dict)`` and ``json.dump(cfg.to_dict())``."""
    root.mkdir(parents=True)
    save_file(weights, root / "sae_weights.safetensors")
    with open(root / "cfg.json", "w") as f:
        json.dump(cfg, f)
    return root


def _weights(d_in=D_IN, d_sae=D_SAE, d_out=D_IN, jump=False, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) * 0.3,
        "W_dec": torch.randn(d_sae, d_out, generator=g) * 0.3,
        "b_enc": torch.randn(d_sae, generator=g) * 0.1,
        "b_dec": torch.randn(d_out, generator=g) * 0.3,
    }
    if jump:
        w["threshold"] = torch.rand(d_sae, generator=g) * 0.3
    return w


def _v6(architecture: str, **fields) -> dict:
    metadata = {
        "sae_lens_version": "6.5.1",
        "sae_lens_training_version": "6.5.1",
        "model_name": "tiny-llama",
        "hook_name": HOOK,
        "hook_head_index": None,
        "prepend_bos": True,
        "context_size": 128,
        "dataset_path": "monology/pile-uncopyrighted",
        "model_from_pretrained_kwargs": {},
        **fields.pop("metadata", {}),
    }
    base = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    return {**base, **fields, "metadata": metadata, "architecture": architecture}


def _v5(**fields) -> dict:
    return {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "activation_fn_str": "relu",
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "context_size": 128,
        "model_name": "tiny-llama",
        "hook_name": HOOK,
        "hook_layer": 0,
        "hook_head_index": None,
        "prepend_bos": True,
        "dataset_path": "Skylion007/openwebtext",
        "dataset_trust_remote_code": True,
        "normalize_activations": "none",
        "dtype": "float32",
        "device": "cpu",
        "sae_lens_training_version": "5.3.0",
        "activation_fn_kwargs": {},
        "neuronpedia_id": None,
        "model_from_pretrained_kwargs": {},
        "seqpos_slice": [None],
        **fields,
    }


def _cases():
    w_topk = _weights(seed=1)
    w_topk["W_dec"] = w_topk["W_dec"] * torch.linspace(0.5, 3.0, D_SAE)[:, None]  # norms far from 1
    w_scaled = _weights(seed=2) | {"scaling_factor": torch.linspace(0.5, 2.0, D_SAE)}
    w_log = _weights(seed=3)
    w_log["log_threshold"] = torch.log(
        torch.rand(D_SAE, generator=torch.Generator().manual_seed(4)) * 0.3 + 0.01
    )
    return {
        "v6-standard": (_v6("standard"), _weights()),
        "v6-topk-rescaled": (_v6("topk", k=K, rescale_acts_by_decoder_norm=True), w_topk),
        "v6-jumprelu": (_v6("jumprelu", apply_b_dec_to_input=False), _weights(jump=True, seed=5)),
        "v6-transcoder": (
            _v6(
                "transcoder",
                d_out=24,
                apply_b_dec_to_input=False,
                metadata={"hook_name_out": "blocks.0.hook_mlp_out"},
            ),
            _weights(d_out=24, seed=6),
        ),
        "v6-jumprelu-transcoder": (
            _v6("jumprelu_transcoder", d_out=24, apply_b_dec_to_input=False, metadata={"hook_name_out": "b"}),
            _weights(d_out=24, jump=True, seed=7),
        ),
        "v5-standard-finetuning-scale": (_v5(finetuning_scaling_factor=True), w_scaled),
        "v4-topk-as-activation-fn": (
            _v5(activation_fn_str="topk", activation_fn_kwargs={"k": K}),
            _weights(seed=8),
        ),
        "v5-jumprelu-log-threshold": (_v5(architecture="jumprelu"), w_log),
        "v3-hook-point": (
            {k: v for k, v in _v5(normalize_activations=False).items() if k != "hook_name"}
            | {"hook_point": HOOK},
            _weights(seed=9),
        ),
    }


@pytest.mark.parametrize("case", sorted(_cases()))
def test_saelens_files_import_to_saelens_outputs(tmp_path, case):
    cfg, weights = _cases()[case]
    root = _write_saelens(tmp_path / case, cfg, weights)
    assert detect_format(root) == "saelens"
    sae = load_sae(root)
    x = _x()
    acts = _saelens_encode(weights, cfg, x)
    assert 0 < int((acts != 0).sum()) < acts.numel()
    torch.testing.assert_close(sae.encode(x), acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        sae.decode(sae.encode(x)), _saelens_decode(weights, cfg, acts), atol=1e-5, rtol=1e-5
    )
    meta = cfg.get("metadata", cfg)
    assert sae.cfg.hook_name == meta.get("hook_name", cfg.get("hook_point"))
    assert sae.cfg.out_hook_name == meta.get("hook_name_out")
    expected_kind = {"standard": "relu", "topk": "topk"}.get(cfg["architecture"], "jumprelu")
    if cfg.get("activation_fn_str") == "topk":
        expected_kind = "topk"
    if cfg["architecture"] == "transcoder":
        expected_kind = "relu"
    assert sae.cfg.kind == expected_kind


def _export_formulas(root: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    cfg = json.loads((root / "cfg.json").read_text())
    w = load_file(root / "sae_weights.safetensors")
    acts = _saelens_encode(w, cfg, x)
    return acts, _saelens_decode(w, cfg, acts), cfg


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_saelens_export_is_read_back_by_saelens_formulas_and_by_the_importer(tmp_path, kind):
    sae = _random_sae(kind)
    x = _x()
    acts, recon, cfg = _export_formulas(save_sae(sae, tmp_path / kind, format="saelens"), x)
    torch.testing.assert_close(acts, sae.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recon, sae.decode(sae.encode(x)), atol=1e-5, rtol=1e-5)
    expected_arch = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}[
        kind
    ]
    assert cfg["architecture"] == expected_arch and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == HOOK and cfg["metadata"]["sae_lens_version"].startswith("6.")
    assert cfg["d_in"] == D_IN and cfg["d_sae"] == D_SAE and cfg.get("k") == (K if kind == "topk" else None)
    back = load_sae(tmp_path / kind)
    torch.testing.assert_close(back.decode(back.encode(x)), sae.decode(sae.encode(x)), atol=1e-5, rtol=1e-5)
    assert back.cfg.kind == ("jumprelu" if kind == "batchtopk" else kind)


def test_saelens_export_of_a_transcoder(tmp_path):
    tc = make_sae(
        SAEConfig(d_in=D_IN, d_sae=D_SAE, kind="jumprelu", hook_name=HOOK, out_hook_name="o", d_out=8)
    )
    with torch.no_grad():
        tc.input_scale.fill_(3.0)
        tc.output_scale.fill_(0.5)
        tc.b_dec.normal_()
        tc.threshold.fill_(0.05)
    x = _x()
    acts, recon, cfg = _export_formulas(save_sae(tc, tmp_path / "tc", format="saelens"), x)
    assert cfg["architecture"] == "jumprelu_transcoder" and cfg["d_out"] == 8
    assert cfg["metadata"]["hook_name_out"] == "o"
    torch.testing.assert_close(recon, tc.decode(tc.encode(x)), atol=1e-5, rtol=1e-5)
    back = load_sae(tmp_path / "tc")
    assert back.cfg.out_hook_name == "o" and back.cfg.d_out == 8
    torch.testing.assert_close(back.decode(back.encode(x)), recon, atol=1e-5, rtol=1e-5)


def test_saelens_scaling_factor_for_expected_average_only_in(tmp_path):
    cfg, w = _v6("standard", normalize_activations="expected_average_only_in"), _weights()
    root = _write_saelens(tmp_path / "n", cfg, w)
    x = _x()
    with pytest.warns(UserWarning, match="norm_scaling_factor"):
        unscaled = load_sae(root)
    torch.testing.assert_close(unscaled.encode(x), _saelens_encode(w, cfg, x))
    sae = load_sae(root, norm_scaling_factor=0.25)
    acts = _saelens_encode(w, cfg, x * 0.25)  # SAELens' runner scales inputs and unscales outputs
    torch.testing.assert_close(sae.encode(x), acts)
    torch.testing.assert_close(sae.decode(acts), _saelens_decode(w, cfg, acts) / 0.25)


@pytest.mark.parametrize(
    "cfg_edit, weight_edit, message",
    [
        ({"architecture": "gated"}, {}, "architecture 'gated' has no mechscope kind; importable"),
        ({"architecture": "jumprelu"}, {}, r"lacks \['threshold'\]"),
        ({"d_in": 99}, {}, "says d_in=99 but"),
        ({"normalize_activations": "layer_norm"}, {}, "per-token normalisation"),
        ({"metadata": {"hook_head_index": 2}}, {}, "per-head SAEs"),
        ({}, {"W_skip": torch.zeros(2, 2)}, r"tensors \['W_skip'\]"),
        ({}, {"drop": "b_enc"}, r"lacks \['b_enc'\]"),
        ({"architecture": "topk", "k": 999}, {}, "k must be in"),
    ],
)
def test_bad_saelens_files_are_refused(tmp_path, cfg_edit, weight_edit, message):
    cfg, w = _v6("standard"), _weights()
    cfg |= {k: v for k, v in cfg_edit.items() if k != "metadata"}
    cfg["metadata"] |= cfg_edit.get("metadata", {})
    w.pop(weight_edit.pop("drop", None), None)
    w |= weight_edit
    root = _write_saelens(tmp_path / "bad", cfg, w)
    with pytest.raises(SAEFormatError, match=message):
        saelens.load(root)


def test_an_exported_sae_loads_in_saelens(tmp_path):
    """Optional (the issue's cross-check): only where sae-lens is installed."""
    sae_lens = pytest.importorskip("sae_lens")
    sae = _random_sae("topk")
    theirs = sae_lens.SAE.load_from_disk(save_sae(sae, tmp_path / "e", format="saelens"))
    x = _x()
    torch.testing.assert_close(theirs.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        theirs.decode(theirs.encode(x)), sae.decode(sae.encode(x)), atol=1e-5, rtol=1e-5
    )


# ---------------------------------------------------------------- Gemma Scope
def _gemma_scope_file(path: Path, seed: int = 0, d_in=D_IN, lowercase=False) -> dict[str, np.ndarray]:
    """As the release stores it: float32 numpy arrays in params.npz."""
    rng = np.random.default_rng(seed)
    arrays = {
        "W_enc": rng.normal(0, 0.3, (d_in, D_SAE)).astype(np.float32),
        "W_dec": rng.normal(0, 0.3, (D_SAE, d_in)).astype(np.float32),
        "b_enc": rng.normal(0, 0.1, D_SAE).astype(np.float32),
        "b_dec": rng.normal(0, 0.3, d_in).astype(np.float32),
        "threshold": rng.uniform(0, 0.3, D_SAE).astype(np.float32),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = {("w_" + k[2:] if lowercase and k.startswith("W_") else k): v for k, v in arrays.items()}
    np.savez(path, **stored)
    return arrays


def _gemma_scope_formulas(p: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Gemma Scope tutorial's JumpReLUSAE, in numpy."""
    pre = x @ p["W_enc"] + p["b_enc"]
    acts = (pre > p["threshold"]) * np.maximum(pre, 0)
    return acts, acts @ p["W_dec"] + p["b_dec"]


@pytest.mark.parametrize("lowercase", [False, True])
def test_gemma_scope_params_import_to_the_tutorial_formulas(tmp_path, lowercase):
    file = tmp_path / "gemma-scope-2b-pt-res" / "layer_0" / "width_16k" / "average_l0_20" / "params.npz"
    arrays = _gemma_scope_file(file, lowercase=lowercase)
    assert detect_format(file.parent) == "gemma_scope"
    sae = load_sae(file.parent)
    assert sae.cfg.kind == "jumprelu" and sae.cfg.hook_name == HOOK and not sae.cfg.apply_b_dec_to_input
    x = _x().numpy()
    acts, recon = _gemma_scope_formulas(arrays, x)
    assert 0 < (acts != 0).sum() < acts.size
    with torch.no_grad():
        got = sae.encode(torch.from_numpy(x))
        np.testing.assert_allclose(got.numpy(), acts, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(sae.decode(got).numpy(), recon, atol=1e-5, rtol=1e-5)


def test_gemma_scope_hook_inference_and_refusals(tmp_path, tiny_llama):
    assert gemma_scope.infer_hook_name(Path("/x/gemma-scope-9b-pt-mlp/layer_20/width_131k/a/params.npz")) == (
        "blocks.20.hook_mlp_out"
    )
    assert gemma_scope.infer_hook_name(Path("/x/gemma-scope-2b-pt-att-canonical/layer_3/w/params.npz")) == (
        "blocks.3.attn.hook_z"
    )
    loose = tmp_path / "params.npz"
    _gemma_scope_file(loose)
    with pytest.raises(SAEFormatError, match="pass hook_name="):
        gemma_scope.load(loose)
    assert (
        gemma_scope.load(loose, hook_name="blocks.1.hook_resid_pre").cfg.hook_name
        == "blocks.1.hook_resid_pre"
    )
    narrow = tmp_path / "narrow" / "params.npz"
    _gemma_scope_file(narrow, d_in=32)
    with pytest.raises(IncompatibleSAEError, match="is 64 wide but the SAE expects 32"):
        gemma_scope.load(narrow, hook_name=HOOK, model=tiny_llama)
    missing = tmp_path / "missing.npz"
    np.savez(missing, W_enc=np.zeros((2, 3), np.float32), W_dec=np.zeros((3, 2), np.float32))
    with pytest.raises(SAEFormatError, match=r"lacks \['b_enc', 'b_dec', 'threshold'\]"):
        gemma_scope.load(missing, hook_name=HOOK)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, W_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(SAEFormatError, match="not a readable"):
        gemma_scope.load(pickled, hook_name=HOOK)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(SAEFormatError, match="not a readable"):
        gemma_scope.load(tmp_path / "junk.npz", hook_name=HOOK)


# ---------------------------------------------------------------- native
@pytest.fixture(scope="module")
def tiny_llama() -> ms.HookedModel:
    return ms.load_model("tiny-llama")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_native_round_trip_is_identical(tmp_path, kind):
    sae = _random_sae(kind, model_name="tiny-llama", seed=4)
    root = native.save(sae, tmp_path / kind)
    assert sorted(p.name for p in root.iterdir()) == [
        "cfg.json",
        "sae.safetensors",
    ]  # no temporary files left
    assert detect_format(root) == "native"
    back = load_sae(root)
    assert not back.training  # loaded for inference (BatchTopK then uses its threshold)
    assert back.cfg == sae.cfg
    assert sae.state_dict().keys() == back.state_dict().keys()
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in sae.state_dict().items())
    x = _x()
    assert torch.equal(back.encode(x), sae.encode(x)) and torch.equal(back(x).recon, sae(x).recon)
    meta = json.loads((root / "cfg.json").read_text())
    assert meta["normalisation"] == {
        "method": "expected_average_only_in",
        "input_scale": 2.5,
        "output_scale": 2.5,
    }
    assert meta["format_version"] == 1 and meta["config"]["kind"] == kind


def test_native_transcoder_round_trip_and_model_checks(tmp_path, tiny_llama):
    tc = make_sae(
        SAEConfig(
            d_in=64, d_sae=32, kind="relu", hook_name="blocks.0.ln2.hook_normalized", out_hook_name=HOOK
        )
    )
    back = native.load(native.save(tc, tmp_path / "tc"), model=tiny_llama)
    assert back.cfg == tc.cfg and torch.equal(back.W_dec, tc.W_dec)
    native.save(_random_sae("relu"), tmp_path / "narrow")  # 16 wide, the hook is 64
    with pytest.raises(IncompatibleSAEError, match="is 64 wide but the SAE expects 16"):
        native.load(tmp_path / "narrow", model=tiny_llama)
    native.save(_random_sae("relu", hook_name="blocks.0.hook_nope"), tmp_path / "nohook")
    with pytest.raises(UnknownHookError, match="blocks.0.hook_nope"):
        native.load(tmp_path / "nohook", model=tiny_llama)


def test_native_refuses_corrupt_torn_and_foreign_files(tmp_path):
    root = native.save(_random_sae("topk"), tmp_path / "s")
    weights = root / "sae.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-8] + bytes(8))
    with pytest.raises(SAEFormatError, match="does not match the checksum"):
        native.load(root)
    weights.write_bytes(good)
    meta = json.loads((root / "cfg.json").read_text())
    for edit, message in [
        ({"format_version": 9}, "format_version 9; this mechscope reads 1"),
        ({"format": "other"}, "not a mechscope SAE config"),
        ({"config": {**meta["config"], "colour": 1}}, "unknown SAE config field"),
        ({"config": {**meta["config"], "kind": "gated"}}, "unknown SAE kind 'gated'"),
    ]:
        (root / "cfg.json").write_text(json.dumps({**meta, **edit}))
        with pytest.raises(SAEFormatError, match=message):
            native.load(root)
    state = load_file(weights)
    del state["b_enc"]
    save_file(state, weights)
    (root / "cfg.json").write_text(json.dumps(meta))
    with pytest.raises(SAEFormatError, match=r"missing \['b_enc'\]"):
        native.load(root, verify=False)
    (root / "cfg.json").write_text("{ torn")
    with pytest.raises(SAEFormatError, match="not valid JSON"):
        native.load(root)
    weights.unlink()
    with pytest.raises(SAEFormatError, match="no known SAE format"):
        load_sae(tmp_path / "s")
    with pytest.raises(SAEFormatError, match="does not exist"):
        load_sae(tmp_path / "nowhere")


def test_format_registry():
    assert sorted(FORMATS) == ["gemma_scope", "native", "saelens"]
    with pytest.raises(ValueError, match="cannot write SAE format 'gemma_scope'; writable"):
        save_sae(_random_sae("relu"), "/tmp/unused", format="gemma_scope")
    with pytest.raises(ValueError, match="unknown SAE format"):
        load_sae("/", format="safetensors")
    with pytest.raises(SAEFormatError, match="no inference format for a topk transcoder"):
        saelens.save(
            make_sae(SAEConfig(d_in=4, d_sae=8, kind="topk", k=2, hook_name="a", out_hook_name="b")), "/x"
        )
