"""Floor 5: a GPT (decoder-only Transformer) in the shape of nanoGPT's ``model.py``.

    idx (B, T) ─ wte + wpe ─ dropout ─ [Block] × n_layer ─ ln_f ─ lm_head ─ logits (B, T, V)
    Block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))          (pre-LayerNorm)

Module paths are fixed (``blocks.{i}.attn.q_proj`` ...) because LoRA finds its targets by
these names, exactly as PEFT does on a Hugging Face model.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .. import backend
from .. import functional as F
from ..nn import Dropout, Embedding, LayerNorm, Linear, Module, ModuleList
from ..autograd import no_grad
from ..tensor import Tensor


@dataclass
class GPTConfig:
    vocab_size: int = 96     # number of distinct tokens (characters here)
    block_size: int = 64     # longest context: the size of the position table wpe
    n_layer: int = 4         # Transformer blocks stacked
    n_head: int = 4          # attention heads; each sees n_embd // n_head dimensions
    n_embd: int = 128        # width of the residual stream
    dropout: float = 0.0     # on embeddings and residual branches; 0 keeps steps deterministic
    bias: bool = True        # biases in Linear layers and LayerNorms (GPT-2 has them)
    causal: bool = True      # True: a decoder (GPT), each position sees only itself and the past;
    # False: an encoder (BERT), every position sees the whole sequence (train it by masked LM)

    def __post_init__(self):
        for field in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, field) < 1:
                raise ValueError(f"GPTConfig.{field} must be >= 1, got {getattr(self, field)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(Module):
    """Multi-head attention with separate q/k/v projections (the names LoRA targets).

    Causal for a decoder; with ``config.causal=False`` the same layer is an encoder's
    bidirectional self-attention (the class keeps nanoGPT's name, as the module paths do)."""

    def __init__(self, config: GPTConfig, rng, dropout_rng):
        d = config.n_embd
        self.n_head = config.n_head
        self.causal = config.causal
        self.q_proj = Linear(d, d, config.bias, rng)
        self.k_proj = Linear(d, d, config.bias, rng)
        self.v_proj = Linear(d, d, config.bias, rng)
        self.out_proj = Linear(d, d, config.bias, rng)
        self.resid_dropout = Dropout(config.dropout, dropout_rng)

    def _heads(self, x):
        """(B, T, C) -> (B, n_head, T, head_dim): each head attends in its own subspace."""
        b, t, c = x.shape
        return x.reshape(b, t, self.n_head, c // self.n_head).transpose(1, 2)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, causal=self.causal)  # softmax(q kᵀ/√d_head) v
        y = y.transpose(1, 2).reshape(b, t, c)                    # concatenate the heads
        return self.resid_dropout(self.out_proj(y))

    def attention_map(self, x):
        """The attention weights (B, n_head, T, T) for input x, as an array (for plots)."""
        with no_grad():
            return F.attention_weights(self._heads(self.q_proj(x)), self._heads(self.k_proj(x)),
                                       self.causal)


class MLP(Module):
    """Position-wise feed-forward: d -> 4d -> GELU -> d."""

    def __init__(self, config: GPTConfig, rng, dropout_rng):
        self.fc1 = Linear(config.n_embd, 4 * config.n_embd, config.bias, rng)
        self.fc2 = Linear(4 * config.n_embd, config.n_embd, config.bias, rng)
        self.dropout = Dropout(config.dropout, dropout_rng)

    def forward(self, x):
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


class Block(Module):
    def __init__(self, config: GPTConfig, rng, dropout_rng):
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, rng, dropout_rng)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config, rng, dropout_rng)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # pre-LN: the residual stream itself is never normalised
        return x + self.mlp(self.ln_2(x))


def _as_ids(idx):
    ids = backend.asarray(idx.data if isinstance(idx, Tensor) else idx)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"token ids must be an integer array of shape (batch, time), "
                         f"got shape {ids.shape} and dtype {ids.dtype}")
    if ids.size == 0:
        raise ValueError(f"token ids of shape {ids.shape} are empty: give at least one row of at "
                         "least one token (a prompt of one token, e.g. a newline, for generate)")
    return ids


class GPT(Module):
    """A GPT language model. ``seed`` fixes the initial weights and the dropout masks."""

    def __init__(self, config: GPTConfig, seed: int = 0):
        self.config = config
        init_seed, dropout_seed = np.random.SeedSequence(seed).spawn(2)
        rng = np.random.default_rng(init_seed)
        # One generator for every dropout mask, so a checkpoint can save its state.
        self.dropout_rng = np.random.default_rng(dropout_seed)
        self.wte = Embedding(config.vocab_size, config.n_embd, rng)
        self.wpe = Embedding(config.block_size, config.n_embd, rng)
        self.drop = Dropout(config.dropout, self.dropout_rng)
        self.blocks = ModuleList(Block(config, rng, self.dropout_rng) for _ in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False, rng=rng)
        self._init_weights(rng)

    def _init_weights(self, rng):
        """GPT-2's init: N(0, 0.02) for weights and embeddings, zero biases, and N(0, 0.02/√(2L))
        for the projections that write into the residual stream, so its variance stays
        ~constant however many blocks add to it."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
                continue  # biases are 0 and LayerNorm weights 1 already
            std = residual_std if name.endswith(("out_proj.weight", "fc2.weight")) else 0.02
            p.data[...] = backend.asarray(rng.normal(0.0, std, size=p.shape).astype(p.dtype))
        for _, module in self.named_modules():
            if isinstance(module, Linear) and module.bias is not None:
                module.bias.data[...] = 0

    def hidden_states(self, idx):
        """The final normalised residual stream (B, T, n_embd) for token ids ``idx`` (B, T)."""
        ids = _as_ids(idx)
        t = ids.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}: "
                             f"crop the input to its last {self.config.block_size} tokens")
        x = self.drop(self.wte(ids) + self.wpe(backend.xp.arange(t)))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, idx, targets=None):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), loss or None).

        ``targets`` (B, T): the next token at each position; ``-100`` marks positions that do
        not count (a prompt, padding).
        """
        logits = self.lm_head(self.hidden_states(idx))
        loss = None if targets is None else F.cross_entropy(logits, targets)
        return logits, loss

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 rng=None):
        """Extend idx (B, T) by ``max_new_tokens`` tokens, one at a time.

        temperature 0 means greedy (argmax); otherwise sample from softmax(logits / temperature),
        restricted to the ``top_k`` most likely tokens if given. Returns an int array (B, T+n).
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and not (isinstance(top_k, (int, np.integer)) and top_k > 0):
            raise ValueError(f"top_k must be a positive integer or None (no limit), got {top_k!r}")
        if temperature > 0 and rng is None:
            raise ValueError("sampling needs rng=np.random.default_rng(seed); or pass temperature=0 for greedy")
        ids = _as_ids(idx)
        was_training = self.training
        self.eval()
        with no_grad():
            for _ in range(max_new_tokens):
                logits = self.forward(ids[:, -self.config.block_size:])[0].data[:, -1, :]
                if temperature == 0:
                    nxt = logits.argmax(axis=-1)
                else:
                    logits = backend.to_numpy(logits).astype(np.float64) / temperature
                    if top_k is not None:
                        kth = np.sort(logits, axis=-1)[:, -min(top_k, logits.shape[-1])][:, None]
                        logits = np.where(logits < kth, -np.inf, logits)
                    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
                    probs /= probs.sum(axis=-1, keepdims=True)
                    nxt = backend.asarray(np.array([rng.choice(len(p), p=p) for p in probs]))
                ids = backend.xp.concatenate([ids, nxt[:, None].astype(ids.dtype)], axis=1)
        self.train(was_training)
        return ids


def _check_lengths(lengths, b: int, t: int):
    """``lengths`` (b,) integers in [1, t]: 0 or past the row would read the wrong position."""
    lengths = backend.asarray(lengths)
    if lengths.shape != (b,) or lengths.dtype.kind not in "iu":
        raise ValueError(f"lengths must be {b} integers (one per row), got shape {lengths.shape} "
                         f"and dtype {lengths.dtype}")
    bad = backend.to_numpy(lengths[(lengths < 1) | (lengths > t)])
    if bad.size:
        raise ValueError(f"lengths must lie in [1, {t}] (each row's count of real tokens, at most "
                         f"the sequence length), got {bad[:5].tolist()}")
    return lengths


class GPTForSequenceClassification(Module):
    """A GPT body with a ``score`` head (n_embd -> num_labels) read at the last real token.

    Causal attention means the last real token is the only position that has seen the whole
    input, and padding placed after it cannot change it. The body keeps its ``lm_head`` so the
    same model can still be asked about its language-model task (to measure forgetting).
    """

    def __init__(self, config: GPTConfig, num_labels: int, seed: int = 0):
        self.num_labels = num_labels
        self.transformer = GPT(config, seed)
        rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(3)[2])
        self.score = Linear(config.n_embd, num_labels, bias=False, rng=rng)
        self.score.weight.data[...] = backend.asarray(rng.normal(0.0, 0.02, size=self.score.weight.shape)
                                                .astype(self.score.weight.dtype))

    def forward(self, idx, lengths=None, labels=None, class_weight=None):
        """idx (B, T), lengths (B,) real tokens per row (default: all T) -> (logits (B, C), loss)."""
        ids = _as_ids(idx)
        b, t = ids.shape
        last = backend.xp.full(b, t - 1) if lengths is None else _check_lengths(lengths, b, t) - 1
        h = self.transformer.hidden_states(ids)
        logits = self.score(h[backend.xp.arange(b), last])
        loss = None if labels is None else F.cross_entropy(logits, labels, weight=class_weight)
        return logits, loss


class GPTForTokenClassification(Module):
    """A GPT body with a ``classifier`` head (n_embd -> num_labels) at every position: one label
    per token, for named-entity recognition (Hugging Face's ``GPT2ForTokenClassification`` and
    ``BertForTokenClassification`` both call this head ``classifier``; ``score`` is their name for
    the sequence-level head, so the two heads never share a name).

    With a decoder body (``causal=True``) the label of a token can only use the tokens before it;
    an encoder body (``causal=False``) sees both sides, which is why BERT is the usual choice.
    """

    def __init__(self, config: GPTConfig, num_labels: int, seed: int = 0):
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.num_labels = num_labels
        self.transformer = GPT(config, seed)
        rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(4)[3])
        self.classifier = Linear(config.n_embd, num_labels, bias=True, rng=rng)
        self.classifier.weight.data[...] = backend.asarray(
            rng.normal(0.0, 0.02, size=self.classifier.weight.shape).astype(self.classifier.weight.dtype))
        self.classifier.bias.data[...] = 0

    def forward(self, idx, labels=None, class_weight=None):
        """idx (B, T) -> (logits (B, T, num_labels), loss or None); ``labels`` (B, T) hold -100
        at positions that do not count (padding)."""
        logits = self.classifier(self.transformer.hidden_states(idx))
        loss = None if labels is None else F.cross_entropy(logits, labels, weight=class_weight)
        return logits, loss
