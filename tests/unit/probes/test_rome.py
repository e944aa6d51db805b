"""ROME on tiny models: the closed form against an independent constrained least-squares solve, the
whole edit in every MLP family of the registry, exact undo, and clear errors for bad requests."""

from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import weakref

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import mechscope as ms
from mechscope.data.contexts import ContextConfig, context_stream
from mechscope.data.corpus import Corpus, pydoc_corpus
from mechscope.interventions.causal_trace import causal_trace, subject_positions
from mechscope.models.adapters import adapters
from mechscope.models.adapters.base import in_out
from mechscope.probes.rome import EditError, EditRequest, RomeConfig, compute_value, rank_one_update, rome
from mechscope.probes.rome_eval import evaluate_edit, ngram_entropy
from mechscope.probes.rome_keys import LayerTrace, key_covariance, locate_layer
from mechscope.probes.rome_request import subject_tokens

WITH_MLP = sorted(name for name, a in adapters().items() if a.has_mlp)
WITHOUT_MLP = sorted(name for name, a in adapters().items() if not a.has_mlp)
# Random tiny models cannot carry a fact from the subject through attention to a later position,
# so the tests put the subject last (its MLP output feeds the prediction directly) and leave out
# the weight decay and the clamp that keep a real model's edit small.
PROMPT, SUBJECT, TARGET = "The home of {}", "Alice Smith", "!"
CFG = RomeConfig(
    layer=0,
    cov_tokens=1024,
    cov_context_length=64,
    prefix_lengths=(4,),
    prefixes_per_length=3,
    weight_decay=0.0,
    clamp_norm_factor=50.0,
)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus.from_texts([pydoc_corpus().document(i).text for i in range(5)], "pydoc5")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("rome")


def _kkt(C, key, residual):
    """min_x xᵀ C x s.t. keyᵀ x = r, for every column r of ΔW, from the KKT system solved directly."""
    d = C.shape[0]
    A = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    A[:d, :d], A[:d, d], A[d, :d] = 2 * C, key, key
    rhs = torch.zeros(d + 1, residual.shape[0], dtype=torch.float64)
    rhs[d] = residual
    return torch.linalg.solve(A, rhs)[:d]  # [d_mlp d_model]


def test_rank_one_update_is_the_constrained_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    d_mlp, d_model, n = 12, 5, 200
    K = torch.randn(n, d_mlp, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, d_mlp).double()
    C = K.T @ K / n
    W = torch.randn(d_mlp, d_model, generator=g, dtype=torch.float64)
    key, value = torch.randn(d_mlp, generator=g).double(), torch.randn(d_model, generator=g).double()
    upd = rank_one_update(W.float(), C.float(), key.float(), value.float())
    delta = torch.outer(upd.left, upd.right).double()
    torch.testing.assert_close(key @ (W + delta), value, atol=1e-4, rtol=1e-4)
    # The same ΔW minimises ‖K ΔW‖² (= n tr(ΔWᵀ C ΔW)) among all ΔW with key (W + ΔW) = value.
    torch.testing.assert_close(delta, _kkt(C, key, value - key @ W), atol=1e-4, rtol=1e-4)
    # A key orthogonal to key under C⁻¹ keeps its output; any other feasible ΔW moves K more.
    other = torch.randn(d_mlp, generator=g).double()
    other -= (other @ torch.linalg.solve(C, key)) / (key @ torch.linalg.solve(C, key)) * key
    torch.testing.assert_close(other @ delta, torch.zeros(d_model, dtype=torch.float64), atol=1e-4, rtol=0)
    naive = torch.outer(key / key.dot(key), value - key @ W)  # the update without C
    assert (K @ delta).norm() < (K @ naive).norm()


def test_singular_covariance_asks_for_more_tokens():
    with pytest.raises(EditError, match="cov_tokens"):
        rank_one_update(torch.ones(3, 2), torch.zeros(3, 3), torch.ones(3), torch.ones(2))


@pytest.mark.parametrize("family", WITH_MLP)
def test_edit_writes_v_at_k_and_makes_the_model_say_the_target(family, corpus, cache):
    model = ms.load_model(f"tiny-{family}")
    edit = rome(model, PROMPT, SUBJECT, TARGET, CFG, corpus=corpus, cache_dir=cache)
    text, bang = edit.request.prompt, model.to_single_token(TARGET)
    module = model.module(f"{model.adapter.layers}.0.{model.adapter.mlp_out_proj}")
    param, logits = module.weight.detach().clone(), model(text)
    bias = 0 if module.bias is None else module.bias.detach()
    with torch.no_grad():
        before = module(edit.value.key[None])[0] - bias
    assert int(logits[0, -1].argmax()) != bang
    W0 = in_out(module).detach().clone()
    with edit:
        with torch.no_grad():  # the HF module itself, whatever its weight layout: maps k* to v*
            after = module(edit.value.key[None])[0] - bias
        # What changed in the parameter is the rank-one ΔW, and nothing else.
        dW = in_out(module).detach().double() - W0.double()
        torch.testing.assert_close(dW, edit.delta_w.double(), atol=1e-6, rtol=1e-4)
        s = torch.linalg.svdvals(dW)
        assert s[1] < 1e-5 * s[0]
        torch.testing.assert_close(after, edit.value.value, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(after - before, edit.value.delta, atol=1e-4, rtol=1e-4)
        assert int(model(text)[0, -1].argmax()) == bang
    assert torch.equal(module.weight, param)
    assert torch.equal(model(text), logits)


def _plain_run(model, text, end, extra, delta):
    """Plain HF forward of one unpadded prompt (+ ``extra`` ids) with ``delta`` added to block 0's MLP output
    at the last token starting before character ``end`` (found from the tokenizer's offsets); returns
    that token's key (the MLP output projection's input), its MLP output and the log-probabilities."""
    tok = model.tokenizer
    bos = [tok.bos_token_id] if model.prepend_bos else []
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    pos = len(bos) + max(i for i, (s, _) in enumerate(enc["offset_mapping"]) if s < end)
    module = model.module(f"{model.adapter.layers}.0.{model.adapter.mlp_out_proj}")
    seen = {}

    def pre(mod, args):
        seen["key"] = args[0][0, pos].clone()

    def post(mod, args, out):
        seen["out"] = out[0, pos].clone()
        out = out.clone()
        out[0, pos] += delta
        return out

    handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        with torch.no_grad():
            logits = model.hf_model(torch.tensor([bos + enc["input_ids"] + extra])).logits[0]
    finally:
        for h in handles:
            h.remove()
    return seen["key"], seen["out"], logits.float().log_softmax(-1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # rotary and learned absolute positions
def test_key_and_losses_match_plain_hf_forwards_one_prompt_at_a_time(family):
    """compute_value batches prompts of different lengths, left-padded, starting at the edited layer;
    here each prompt runs alone through the plain HF model with plain torch hooks."""
    model = ms.load_model(f"tiny-{family}")
    target = " no!"  # three tokens: the teacher-forced part of the batch is exercised
    request = EditRequest.make(PROMPT, SUBJECT, target)
    prefixes = ["", "Once upon a time. ", "Hi. "]
    cfg = dataclasses.replace(CFG, steps=3, weight_decay=0.5)
    value = compute_value(model, request, 0, prefixes, cfg)
    ids = model.tokenizer(target, add_special_tokens=False)["input_ids"]
    n, end = len(ids), request.span[1]
    keys, nlls = [], []
    for p in prefixes:
        key, out, logp = _plain_run(model, p + request.prompt, len(p) + end, ids[:-1], value.delta)
        keys.append(key)
        nlls.append(-logp[-n:].gather(1, torch.tensor(ids)[:, None]).mean())
        v0 = out if not p else v0
    torch.testing.assert_close(value.key, torch.stack(keys).float().mean(0), atol=1e-5, rtol=1e-5)
    kl_text = SUBJECT + " is a"
    after = _plain_run(model, kl_text, len(SUBJECT), [], value.delta)[2][-1]
    before = _plain_run(model, kl_text, len(SUBJECT), [], torch.zeros_like(value.delta))[2][-1]
    kl = float((after.exp() * (after - before)).sum())
    nll = float(torch.stack(nlls).mean())
    decay = 0.5 * float(value.delta.norm()) / float(v0.float().norm()) ** 2
    last = value.history[-1]
    assert last["nll"] == pytest.approx(nll, rel=1e-4, abs=1e-6)
    assert last["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
    assert last["weight_decay"] == pytest.approx(decay, rel=1e-4)
    assert last["loss"] == pytest.approx(nll + cfg.kl_factor * kl + decay, rel=1e-4)
    assert value.history[0]["kl"] == pytest.approx(0, abs=1e-6) and last["nll"] < value.history[0]["nll"]


def test_apply_twice_or_undo_unapplied_is_an_error(corpus, cache):
    model = ms.load_model("tiny-llama")
    edit = rome(model, PROMPT, SUBJECT, TARGET, CFG, corpus=corpus, cache_dir=cache)
    with pytest.raises(EditError, match="nothing to undo"):
        edit.undo()
    edit.apply()
    with pytest.raises(EditError, match="already applied"):
        edit.apply()
    edit.undo()
    assert not edit.applied


def test_a_model_with_an_applied_edit_can_be_freed(corpus, cache):
    model = ms.load_model("tiny-llama")
    rome(model, PROMPT, SUBJECT, TARGET, CFG, corpus=corpus, cache_dir=cache).apply()
    ref = weakref.ref(model.hf_model)
    del model
    gc.collect()
    assert ref() is None


def test_stacked_edits_undo_last_in_first_out_back_to_the_original_bits(corpus, cache):
    model = ms.load_model("tiny-llama")
    first = rome(model, PROMPT, SUBJECT, TARGET, CFG, corpus=corpus, cache_dir=cache)
    second = rome(model, PROMPT, "Bob Jones", "?", CFG, corpus=corpus, cache_dir=cache)
    module = model.module(f"{model.adapter.layers}.0.{model.adapter.mlp_out_proj}")
    original, W0 = module.weight.detach().clone(), in_out(module).detach().double()
    first.apply()
    second.apply()
    dW = in_out(module).detach().double() - W0  # the two rank-one updates add up
    torch.testing.assert_close(dW, (first.delta_w + second.delta_w).double(), atol=1e-5, rtol=1e-4)
    with pytest.raises(EditError, match="undo it first"):
        first.undo()  # copying first's original back would silently erase second
    assert first.applied and second.applied
    second.undo()
    first.undo()
    assert torch.equal(module.weight, original)


def test_evaluation_matches_direct_probabilities_and_leaves_the_model_as_found(corpus, cache):
    model = ms.load_model("tiny-gpt2")
    edit = rome(model, PROMPT, SUBJECT, TARGET, CFG, corpus=corpus, cache_dir=cache)
    neighbour = "The home of Bob"
    ev = evaluate_edit(edit, paraphrases=["Where is {}"], neighbours=[neighbour], max_new_tokens=3)
    probs = model(edit.request.prompt)[0, -1].softmax(-1)
    old = model.tokenizer.decode([int(probs.argmax())])
    assert ev.efficacy.old == old
    assert ev.efficacy.p_old_before == pytest.approx(float(probs.max()), rel=1e-4)
    with edit:
        after = model(edit.request.prompt)[0, -1].softmax(-1)
        generated = model.generate(neighbour, max_new_tokens=3)
    assert ev.efficacy.p_new_after == pytest.approx(float(after[model.to_single_token(TARGET)]), rel=1e-4)
    assert ev.efficacy.success and ev.summary()["efficacy_success"]
    assert ev.paraphrases[0].prompt == "Where is Alice Smith"
    assert ev.generations[-1][2] == generated
    fluency = np.mean([ngram_entropy(after) for _, _, after in ev.generations])
    assert ev.summary()["fluency_after"] == pytest.approx(fluency)
    assert not edit.applied


def test_fluency_is_romes_weighted_bigram_trigram_entropy():
    # 6 words, all 5 bigrams and 4 trigrams distinct: (2/3 log2 5 + 4/3 log2 4) / 2.
    assert ngram_entropy("The cat sat on the mat") == pytest.approx((2 / 3 * np.log2(5) + 4 / 3 * 2) / 2)
    # "a b" x 4: bigrams ab x4, ba x3; trigrams aba x3, bab x3. Repetition scores lower.
    h2 = -(4 / 7 * np.log2(4 / 7) + 3 / 7 * np.log2(3 / 7))
    assert ngram_entropy("a b a b a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1) / 2)
    assert ngram_entropy("Paris, France.") == pytest.approx((2 / 3 * np.log2(3) + 4 / 3 * 1) / 2)
    assert ngram_entropy("Paris") == 0


def test_locate_layer_is_causal_traces_mlp_column_at_the_last_subject_token():
    model = ms.load_model("tiny-llama")
    prompt, subject = "the big cat sat on a", "big cat"
    full = causal_trace(model, prompt, subject, kinds=("mlp",), window=1, samples=3)
    last = subject_positions(model, prompt, subject)[-1]
    trace = locate_layer(model, EditRequest.make(prompt, subject, "x"), window=1, samples=3)
    torch.testing.assert_close(trace.effect, full.indirect_effect("mlp")[:, last], atol=1e-6, rtol=0)
    assert trace.clean == pytest.approx(full.clean) and trace.answer == full.answer
    assert trace.layer == int(full.indirect_effect("mlp")[:, last].argmax())


@pytest.mark.parametrize(("best", "warned"), [(0.5, False), (0.01, True)])
def test_rome_warns_when_the_located_layer_carries_little_of_the_effect(
    best, warned, corpus, cache, caplog, monkeypatch
):
    rome_module = importlib.import_module("mechscope.probes.rome")  # the package re-exports rome()
    trace = LayerTrace(torch.tensor([0.0, best]), clean=0.7, corrupted=0.1, answer=" x")
    monkeypatch.setattr(rome_module, "locate_layer", lambda *a, **k: trace)
    cfg = dataclasses.replace(CFG, layer=None, steps=0)
    with caplog.at_level("WARNING", logger="mechscope.probes.rome"):
        edit = rome(ms.load_model("tiny-llama"), PROMPT, SUBJECT, TARGET, cfg, corpus=corpus, cache_dir=cache)
    assert edit.layer == 1 and ("little MLP effect" in caplog.text) == warned


def test_key_covariance_is_the_mean_outer_product_and_is_cached(corpus, tmp_path, monkeypatch):
    model = ms.load_model("tiny-gpt2")
    C = key_covariance(model, 1, corpus=corpus, n_tokens=300, context_length=32, cache_dir=tmp_path)
    # Plain torch: a forward pre-hook on the HF output projection collects its inputs.
    keys = []
    module = model.module(f"{model.adapter.layers}.1.{model.adapter.mlp_out_proj}")
    handle = module.register_forward_pre_hook(
        lambda mod, args: keys.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    contexts = list(context_stream(model, corpus, ContextConfig(context_length=32)))[:10]
    with torch.no_grad():
        model.hf_model(torch.from_numpy(np.stack([c.index[:, 0] for c in contexts])).long())
    handle.remove()
    K = torch.cat(keys)[:300].double()
    torch.testing.assert_close(C, K.T @ K / 300, atol=1e-5, rtol=1e-4)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    monkeypatch.setattr(model, "run_with_cache", lambda *a, **k: pytest.fail("the cache was not used"))
    assert torch.equal(
        key_covariance(model, 1, corpus=corpus, n_tokens=300, context_length=32, cache_dir=tmp_path), C
    )


def test_subject_tokens_span_the_subject():
    model = ms.load_model("tiny-gpt2")  # byte-level: one token per character, BOS first
    text = "xx Alice Smith yy"
    first, last = subject_tokens(model, text, 3, 14)
    assert model.to_str_tokens(text)[first : last + 1] == list("Alice Smith")


@pytest.mark.parametrize(
    ("prompt", "subject", "target", "match"),
    [
        (
            "Paris is in France",
            "The Eiffel Tower",
            " Rome",
            "'The Eiffel Tower' is not in the prompt 'Paris is in France'",
        ),
        ("{} and {} are in", "X", " Rome", "exactly one"),
        ("{} is in", "", " Rome", "subject is empty"),
        ("{} is in", "X", "", "target '' is empty"),
        ("{} is in", "X", "   ", "is empty"),
    ],
)
def test_bad_requests_say_what_to_do(prompt, subject, target, match):
    with pytest.raises(EditError, match=match):
        rome(ms.load_model("tiny-llama"), prompt, subject, target, CFG)


def test_full_prompt_and_word_target_are_normalised_as_in_rome():
    req = EditRequest.make("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome")
    assert (req.template, req.target, req.span) == ("{} is located in the city of", " Rome", (0, 16))
    assert EditRequest.make("{} is in ", "X", "Rome").target == "Rome"


@pytest.mark.parametrize("family", WITHOUT_MLP)
def test_model_without_mlp_or_bad_layer_is_refused(family):
    with pytest.raises(EditError, match="no MLPs"):
        rome(ms.load_model(f"tiny-{family}"), PROMPT, SUBJECT, TARGET, CFG)
    with pytest.raises(EditError, match=r"layer must be in \[0, 2\)"):
        rome(ms.load_model("tiny-llama"), PROMPT, SUBJECT, TARGET, RomeConfig(layer=5))


def test_cli_edit_prints_json_and_refuses_a_missing_subject(tmp_path, monkeypatch):
    from mechscope.cli.main import app

    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path))
    args = [
        "edit",
        "tiny-llama",
        "--prompt",
        PROMPT,
        "--subject",
        SUBJECT,
        "--target",
        TARGET,
        "--layer",
        "0",
    ]
    args += [
        "--corpus",
        "pydoc",
        "--cov-tokens",
        "1024",
        "--neighbour",
        "The home of Bob",
        "--max-new-tokens",
        "2",
    ]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["edit"]["layer"] == 0 and out["edit"]["target"] == TARGET
    assert out["evaluation"]["neighbours"][0]["prompt"] == "The home of Bob"
    assert set(out["evaluation"]["summary"]) >= {
        "efficacy_success",
        "paraphrase_success",
        "neighbours_kept",
        "fluency_after",
    }
    assert list(tmp_path.rglob("cov-L0-1024-*.safetensors"))
    bad = CliRunner().invoke(
        app, ["edit", "tiny-llama", "--prompt", "Paris", "--subject", "Rome", "--target", "x"]
    )
    assert bad.exit_code == 2 and "not in the prompt" in bad.output
