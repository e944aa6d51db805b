"""QK/OV circuits reproduce the model's own scores and outputs; composition equals the dense formula;
detectors find planted behaviour."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import mechscope as ms
from mechscope.circuits.composition import MODES, composition_scores
from mechscope.circuits.head_detectors import DETECTORS, copying_scores, head_scores
from mechscope.circuits.qk_ov import PositionalSchemeError, ov_circuit, positional_qk_circuit, qk_circuit
from mechscope.models.adapters import adapters
from mechscope.models.tiny import byte_tokenizer
from mechscope.models.weights import fold_norms


def test_qk_and_ov_circuits_reproduce_single_token_runs(tiny):
    token, c = 5, tiny.cfg
    _, cache = tiny.run_with_cache(
        torch.tensor([[token]]), ["blocks.0.attn.hook_attn_scores", "blocks.0.attn.hook_z"]
    )
    pos = 0 if c.positional == "learned" else None
    scores = (
        qk_circuit(tiny, 0, pos=pos).AB[:, token, token]
        * tiny.layer(0).get_submodule(tiny.adapter.attn).scaling
    )
    if c.attn_softcap:
        scores = torch.tanh(scores / c.attn_softcap) * c.attn_softcap
    torch.testing.assert_close(
        scores, cache["blocks.0.attn.hook_attn_scores"][0, :, 0, 0], atol=1e-5, rtol=1e-5
    )
    w = tiny.weights.blocks[0]
    by_head = torch.einsum("hd,hdm->hm", cache["blocks.0.attn.hook_z"][0, 0], w.W_O) @ tiny.weights.W_U
    torch.testing.assert_close(ov_circuit(tiny, 0, pos=pos).row(token), by_head, atol=1e-5, rtol=1e-5)
    assert qk_circuit(tiny, 0, 1).shape == (c.d_vocab, c.d_vocab)


def test_bad_circuit_requests_are_clear():
    model = ms.load_model("tiny-llama")
    with pytest.raises(PositionalSchemeError, match="rotary positions.*offset="):
        positional_qk_circuit(model, 0)
    with pytest.raises(PositionalSchemeError, match="pos= needs learned.*pass offset="):
        qk_circuit(model, 0, pos=0)
    with pytest.raises(PositionalSchemeError, match="offset -1 puts the query before its key"):
        qk_circuit(model, 0, offset=-1)
    with pytest.raises(IndexError, match="head 9 is out of range"):
        qk_circuit(model, 0, 9)
    with pytest.raises(IndexError, match="layer 5 is out of range"):
        ov_circuit(model, 5)
    gpt2 = ms.load_model("tiny-gpt2")
    with pytest.raises(PositionalSchemeError, match="learned positions, not rotary ones.*pass pos="):
        qk_circuit(gpt2, 0, offset=2)
    assert positional_qk_circuit(gpt2, 1, 0).shape == (gpt2.cfg.n_ctx, gpt2.cfg.n_ctx)


def test_composition_scores_equal_the_dense_definition(tiny):
    result = composition_scores(tiny)
    blocks = fold_norms(tiny.weights).blocks
    la, ha, lb, hb = 0, 1, 1, 2
    # LayerNorm reads only the centred residual: project out the all-ones direction on both sides
    d = tiny.cfg.d_model
    P = torch.eye(d) - (tiny.cfg.norm == "layernorm") * torch.full((d, d), 1 / d)
    ov_a = P @ blocks[la].W_V[ha] @ blocks[la].W_O[ha] @ P
    reads = {
        "Q": P @ blocks[lb].W_Q[hb] @ blocks[lb].W_K[hb].T @ P,
        "K": (P @ blocks[lb].W_Q[hb] @ blocks[lb].W_K[hb].T @ P).T,
        "V": P @ blocks[lb].W_V[hb] @ blocks[lb].W_O[hb] @ P,
    }
    for i, mode in enumerate(MODES):
        fro = torch.linalg.matrix_norm
        expected = fro(ov_a @ reads[mode]) / (fro(ov_a) * fro(reads[mode]))
        torch.testing.assert_close(result.scores[i, la, ha, lb, hb], expected.float(), atol=1e-5, rtol=1e-4)
    assert torch.isnan(result.scores[:, 1, :, 0]).all()  # only later layers compose
    assert 0 < result.baseline[0] < 1 and len(result.top("K", 3)) == 3


def test_detectors_find_a_planted_previous_token_head():
    model = ms.load_model("tiny-llama")
    n = 2 * 16 + 1
    prev = torch.zeros(n, n)
    prev[torch.arange(1, n), torch.arange(n - 1)] = 1
    prev[0, 0] = 1
    with model.hooks({"blocks.1.attn.hook_pattern": ms.edits.replace(prev, head=3)}):
        scores = head_scores(model, seq_len=16, batch=2)
    assert set(scores) == set(DETECTORS)
    assert scores["previous_token"][1, 3] == pytest.approx(1.0)
    assert scores["previous_token"][1, 3] > scores["previous_token"].flatten().sort().values[-2]
    assert scores["induction"].shape == (model.cfg.n_layers, model.cfg.n_heads)


def test_copying_score_equals_the_dense_eigenvalue_fraction():
    model = ms.load_model("tiny-gpt2")
    copy = copying_scores(model)
    dense = ov_circuit(model, 1, 2).AB.double()  # 259 x 259 on the tiny vocabulary
    eig = torch.linalg.eigvals(dense)
    expected = eig.sum().real / eig.abs().sum()
    assert copy.shape == (2, 4)
    assert copy[1, 2].item() == pytest.approx(expected.item(), abs=1e-4)


def test_kurtosis_sees_a_heavy_tailed_basis_and_rotation_hides_it():
    from mechscope.circuits.privileged_basis import excess_kurtosis

    g = torch.Generator().manual_seed(0)
    sparse = torch.randn(4000, 16, generator=g) * (torch.rand(4000, 16, generator=g) < 0.05)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert excess_kurtosis(sparse).mean() > 10
    assert excess_kurtosis(sparse @ rotation).mean() < excess_kurtosis(sparse).mean() / 3
    assert abs(excess_kurtosis(torch.randn(20000, 4, generator=g)).mean()) < 0.2


def _layer0_scores_at_offsets(model: ms.HookedModel, offsets: tuple[int, ...]) -> None:
    """Every (query, key) pair of a random sequence ``offset`` apart: circuit entry == the model's score."""
    toks = torch.randint(0, 256, (1, 7))
    _, cache = model.run_with_cache(toks, ["blocks.0.attn.hook_attn_scores"])
    real = cache["blocks.0.attn.hook_attn_scores"][0]  # [n_heads q_pos k_pos]
    scaling = model.layer(0).get_submodule(model.adapter.attn).scaling
    for offset in offsets:
        circuit = qk_circuit(model, 0, offset=offset).AB
        keys = torch.arange(toks.shape[1] - offset)
        scores = circuit[:, toks[0, keys + offset], toks[0, keys]] * scaling
        if model.cfg.attn_softcap:
            scores = torch.tanh(scores / model.cfg.attn_softcap) * model.cfg.attn_softcap
        torch.testing.assert_close(scores, real[:, keys + offset, keys], atol=1e-5, rtol=1e-5)


def test_rotary_qk_circuit_at_an_offset_reproduces_the_models_scores(tiny):
    if tiny.cfg.positional != "rotary":
        with pytest.raises(PositionalSchemeError, match="not rotary ones"):
            qk_circuit(tiny, 0, offset=1)
        return
    # Gemma's tiny sliding window is 4 tokens: offsets 0..3 are all attended in its layer 0.
    _layer0_scores_at_offsets(tiny, (0, 1, 3))
    # The offset matters (else the test above would pass with any rotation, or none).
    assert not torch.allclose(qk_circuit(tiny, 0, 1, offset=1).AB, qk_circuit(tiny, 0, 1, offset=3).AB)


def test_rotary_qk_circuit_reads_the_models_rope_scaling():
    # YaRN rescales frequencies and multiplies cos/sin by an attention factor (~1.14 here) that the
    # config alone does not spell out; the circuit must use the module's own values.
    adapter, tokenizer = adapters()["llama"], byte_tokenizer()
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(
            adapter.tiny_config(vocab_size=len(tokenizer), rope_parameters=rope)
        ).eval()
    model = ms.HookedModel(hf, tokenizer, adapter)
    assert model.module(adapter.rotary_emb).attention_scaling > 1.1
    _layer0_scores_at_offsets(model, (0, 2, 5))


@pytest.mark.parametrize("family", ["gpt2", "attn_only"])
def test_composition_ignores_the_mean_that_layernorm_removes(family):
    # A LayerNorm cannot see the residual's mean: shifting every head's write along the all-ones
    # direction leaves the model's function unchanged, so its composition scores must not move
    # (TransformerLens centres the weights for the same reason).
    model = ms.load_model(f"tiny-{family}")  # a fresh copy: the edit below stays here
    toks = torch.tensor([[1, 5, 9, 13, 2, 7]])
    logits, scores = model(toks), composition_scores(model).scores
    with torch.no_grad():
        W_O = model.weights.blocks[0].W_O  # a view onto the HF weight
        W_O += torch.randn(*W_O.shape[:2], 1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(toks), logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(composition_scores(model).scores, scores, atol=1e-5, rtol=1e-4, equal_nan=True)


def test_composition_top_lists_only_real_pairs():
    model = ms.load_model("tiny-gpt2")  # 2 layers x 4 heads: 16 (earlier, later) pairs
    top = composition_scores(model).top("K", 50)
    assert len(top) == 16 and all(a[1] < b[1] and math.isfinite(s) for a, b, s in top)
    one_layer = ms.HookedModel(
        AutoModelForCausalLM.from_config(adapters()["gpt2"].tiny_config(n_layer=1)).eval(),
        byte_tokenizer(),
        adapters()["gpt2"],
    )
    assert composition_scores(one_layer).top("Q") == []  # nothing composes in a one-layer model
