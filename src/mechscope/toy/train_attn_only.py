"""Train attention-only transformers on real text and watch induction heads form.

Olsson et al. (2022), "In-context Learning and Induction Heads": two-layer attention-only models
show a phase change early in training, in which induction heads appear and, at the same time,
the in-context-learning score (loss late in the context minus loss early in it) drops. This
module trains such a model on a CPU in minutes (byte-level tokens, so any text works; the
default is the Python documentation that ships with every Python in ``pydoc_data``) and records
both scores as it goes. Zero- and one-layer models are read off their weights: the bigram table
and skip-trigrams.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.circuits.composition import MODES, composition_scores
from mechscope.circuits.head_detectors import head_scores
from mechscope.circuits.qk_ov import ov_circuit, qk_circuit
from mechscope.models import HookedModel
from mechscope.models.adapters import adapters
from mechscope.models.tiny import byte_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class AttnOnlyTrainConfig:
    """One training run of an attention-only transformer."""

    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    n_ctx: int = 128
    positional: str = "learned"
    """``learned`` or ``none``."""
    steps: int = 1500
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    repeat_fraction: float = 0.0
    """Rows that repeat a stretch of the text, as real documents repeat names and phrases; this
    rewards copying from context (0: plain text). Each such row is one stretch of random length
    (8 to half the context) said over and over, so the repeat distance varies from row to row and
    only an induction head, not a fixed positional offset, can predict the repeats."""
    eval_every: int = 100
    seed: int = 0

    def __post_init__(self):
        if self.n_layers < 0 or self.d_model % self.n_heads:
            raise ValueError(
                f"need n_layers >= 0 and d_model divisible by n_heads, got {self.n_layers}, {self.d_model}/{self.n_heads}"
            )
        if self.steps < 1 or self.eval_every < 1:
            raise ValueError("steps and eval_every must be >= 1")
        if not 0 <= self.repeat_fraction <= 1:
            raise ValueError(f"repeat_fraction is a share of rows in [0, 1], got {self.repeat_fraction}")


def offline_text() -> str:
    """About 0.7 MB of English prose and code: the help topics of Python's own documentation."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _batches(ids: Tensor, cfg: AttnOnlyTrainConfig, g: torch.Generator, bos: int):
    """Random windows of the text; a ``repeat_fraction`` of rows are a shorter window said over and over."""
    n = cfg.n_ctx - 1
    while True:
        starts = torch.randint(0, len(ids) - n, (cfg.batch_size,), generator=g)
        rows = torch.stack([ids[s : s + n] for s in starts.tolist()])
        repeat = torch.rand(cfg.batch_size, generator=g) < cfg.repeat_fraction
        periods = torch.randint(min(8, n), max(n // 2, 8) + 1, (cfg.batch_size,), generator=g)
        for r in repeat.nonzero().flatten().tolist():
            p = int(periods[r])
            rows[r] = rows[r, :p].repeat(n // p + 1)[:n]
        yield torch.cat([torch.full((cfg.batch_size, 1), bos), rows], dim=1)


def _token_losses(model: HookedModel, tokens: Tensor) -> Float[Tensor, "batch pos_minus_1"]:
    with torch.no_grad():
        logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none"
    )
    return loss.view(tokens.shape[0], -1)


def icl_score(model: HookedModel, tokens: Tensor, losses: Tensor | None = None) -> float:
    """Mean loss over the last tenth of the context minus over positions 8-16 (negative = learning in context).

    ``losses``: the per-token losses of ``tokens`` if already computed (else one forward here).
    """
    loss = _token_losses(model, tokens) if losses is None else losses
    late = loss[:, -max(1, tokens.shape[1] // 10) :].mean()
    return float(late - loss[:, 8:16].mean())


def train_attn_only(
    cfg: AttnOnlyTrainConfig, text: str | None = None, out_dir: str | Path | None = None
) -> tuple[HookedModel, list[dict]]:
    """Train, evaluating every ``eval_every`` steps: validation loss and ICL score on held-out plain
    text, the best induction and previous-token head scores, and (two or more layers) the
    K-composition of the best previous-token head into the best induction head.

    Returns the trained model (a :class:`HookedModel`) and the history rows. With ``out_dir`` the
    model is saved there (HF format, loads with ``load_model(out_dir)``) with ``train_cfg.json``
    and ``history.jsonl``.
    """
    from mechscope.toy.attn_only import AttnOnlyConfig, AttnOnlyForCausalLM

    tokenizer = byte_tokenizer()
    ids = torch.tensor(list((text or offline_text()).encode("utf-8")), dtype=torch.long)
    split = int(0.9 * len(ids))
    if len(ids) - split < cfg.n_ctx:  # the held-out tenth must hold one whole context window
        raise ValueError(
            f"the text is {len(ids)} bytes; training with n_ctx={cfg.n_ctx} needs at least "
            f"{10 * cfg.n_ctx} (a tenth is held out for validation): pass more text or a smaller n_ctx"
        )
    torch.manual_seed(cfg.seed)
    config = AttnOnlyConfig(
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        max_position_embeddings=cfg.n_ctx,
        positional=cfg.positional,
    )
    hf = AttnOnlyForCausalLM(config)
    model = HookedModel(hf, tokenizer, adapters()["attn_only"], name=f"attn-only-{cfg.n_layers}l")
    opt = torch.optim.AdamW(hf.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))
    )
    g = torch.Generator().manual_seed(cfg.seed)
    bos = tokenizer.bos_token_id
    train_batches = _batches(ids[:split], cfg, g, bos)
    # 256 rows: the ICL score, a difference of means over a few positions, drowns in noise with fewer
    val_cfg = AttnOnlyTrainConfig(**(asdict(cfg) | {"batch_size": 256, "repeat_fraction": 0.0}))
    val = next(_batches(ids[split:], val_cfg, torch.Generator().manual_seed(1), bos))
    common = ids.bincount(minlength=256).topk(64).indices  # probe heads on bytes the model knows
    history = []
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            history.append(_evaluate(model, val, step, common))
            logger.info("%s", history[-1])
        if step == cfg.steps:
            break
        hf.train()
        tokens = next(train_batches)
        loss = hf(input_ids=tokens, labels=tokens, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        schedule.step()
    hf.eval()
    if out_dir is not None:
        _save(model, cfg, history, Path(out_dir))
    return model, history


def _evaluate(model: HookedModel, val: Tensor, step: int, vocab: Tensor) -> dict:
    model.hf_model.eval()
    losses = _token_losses(model, val)
    row = {"step": step, "val_loss": losses.mean().item(), "icl_score": icl_score(model, val, losses)}
    if model.cfg.n_layers:
        scores = head_scores(model, seq_len=min(32, (model.cfg.n_ctx - 1) // 2), batch=4, vocab=vocab)
        row |= {
            "induction": scores["induction"].max().item(),
            "previous_token": scores["previous_token"].max().item(),
        }
    if model.cfg.n_layers >= 2:
        row |= _induction_circuit(model, scores)
    return row


def _induction_circuit(model: HookedModel, scores: dict[str, Tensor]) -> dict:
    """K-composition of the best previous-token head into the best induction head of a later layer.

    An induction head finds "the token after the previous occurrence of the current token" by
    keying on what a previous-token head wrote, which is K-composition (Elhage et al. 2021).
    Reported above the random-matrix baseline, next to the largest K-composition of any pair.
    """
    induction = scores["induction"][1:]  # heads with an earlier layer to compose with
    layer, head = divmod(int(induction.argmax()), model.cfg.n_heads)
    layer += 1
    prev_layer, prev_head = divmod(int(scores["previous_token"][:layer].argmax()), model.cfg.n_heads)
    comp = composition_scores(model)
    k = comp.scores[MODES.index("K")] - comp.baseline[MODES.index("K")]
    return {
        "induction_head": f"L{layer}H{head}",
        "previous_token_head": f"L{prev_layer}H{prev_head}",
        "k_composition": k[prev_layer, prev_head, layer, head].item(),
        "k_composition_max": k.nan_to_num(float("-inf")).max().item(),
    }


def phase_change_step(history: list[dict], min_rise: float = 0.1) -> int | None:
    """The first evaluated step at which the best induction score is halfway from its first value to
    its maximum: where induction heads form. None when it never rises by ``min_rise`` (no phase
    change in this run) or the rows have no induction score (a zero-layer model)."""
    scores = [r.get("induction") for r in history]
    if not scores or scores[0] is None or max(scores) - scores[0] < min_rise:
        return None
    half = (scores[0] + max(scores)) / 2
    return next(r["step"] for r, s in zip(history, scores, strict=True) if s >= half)


def _save(model: HookedModel, cfg: AttnOnlyTrainConfig, history: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.hf_model.save_pretrained(out)
    model.tokenizer.save_pretrained(out)
    (out / "train_cfg.json").write_text(json.dumps({"format_version": 1, **asdict(cfg)}, indent=2))
    (out / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))


# ---------------------------------------------------------------------- reading the weights
@torch.no_grad()
def bigram_table(model: HookedModel) -> Float[Tensor, "d_vocab d_vocab"]:
    """A zero-layer model's next-token log-probabilities for every current token: ``log_softmax(ln_final(W_E) W_U)``."""
    if model.cfg.n_layers != 0:
        raise ValueError(
            f"the bigram table is the whole model only with 0 layers; this one has {model.cfg.n_layers}"
        )
    x = model.weights.W_E * model.cfg.embed_scale
    if model.weights.W_pos is not None:
        x = x + model.weights.W_pos[0]  # position 0's embedding: the table is exact for single tokens
    return model.module(model.adapter.unembed)(model.module(model.adapter.final_norm)(x)).log_softmax(-1)


@torch.no_grad()
def skip_trigrams(model: HookedModel, layer: int = 0, k: int = 10) -> list[tuple[int, str, str, str, float]]:
    """Top skip-trigrams ``source ... destination -> output`` per head, from the QK and OV circuits.

    For each head, the (destination, source) token pairs with the highest QK score are paired with
    the output token that the OV circuit most raises for that source. Returns rows
    ``(head, source, destination, output, qk_score)`` as strings, best first per head.
    """
    tok = model.tokenizer
    rows = []
    vocab = min(model.cfg.d_vocab, len(tok))
    for head in range(model.cfg.n_heads):
        qk = qk_circuit(model, layer, head).AB[:vocab, :vocab]  # [dest src]
        ov = ov_circuit(model, layer, head)
        best = qk.flatten().topk(k)
        for score, flat in zip(best.values.tolist(), best.indices.tolist(), strict=True):
            dest, src = divmod(flat, vocab)
            out = int(ov.row(src)[:vocab].argmax())
            rows.append((head, tok.decode([src]), tok.decode([dest]), tok.decode([out]), score))
    return rows
