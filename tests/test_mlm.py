"""Encoder vs decoder, BERT's masking, and the loss that counts masked positions only."""
import numpy as np
import pytest

from lora_numpy import backend
from lora_numpy.data import CharTokenizer, MaskedLMDataset, mask_tokens, text_tokenizer
from lora_numpy.models import GPT, GPTConfig, GPTForTokenClassification


def test_masking_proportions_on_a_large_sample():
    ids = np.random.default_rng(0).integers(0, 100, size=(2000, 250))  # 500 000 positions
    inputs, labels = mask_tokens(ids, np.random.default_rng(1), mask_token_id=105, vocab_size=106)
    chosen = labels != -100
    n = chosen.size
    # Binomial standard errors are ~0.0005 here; 5 sigma bounds make a flaky failure impossible.
    assert abs(chosen.mean() - 0.15) < 5 * np.sqrt(0.15 * 0.85 / n)
    k = chosen.sum()
    masked = inputs[chosen] == 105
    unchanged = inputs[chosen] == ids[chosen]
    other = ~masked & ~unchanged
    assert abs(masked.mean() - 0.8) < 5 * np.sqrt(0.8 * 0.2 / k)
    # a random draw equals the original 1 time in 106, so "unchanged" is 0.1 + 0.1 / 106
    assert abs(unchanged.mean() - (0.1 + 0.1 / 106)) < 5 * np.sqrt(0.1 * 0.9 / k)
    assert abs(other.mean() - 0.1 * 105 / 106) < 5 * np.sqrt(0.1 * 0.9 / k)
    assert np.array_equal(inputs[~chosen], ids[~chosen])     # unchosen inputs untouched
    assert np.array_equal(labels[chosen], ids[chosen])       # chosen targets are the originals


def test_masking_is_seeded():
    ids = np.arange(600).reshape(6, 100) % 50
    a = mask_tokens(ids, np.random.default_rng(3), 50, 51)
    b = mask_tokens(ids, np.random.default_rng(3), 50, 51)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_only_chosen_positions_carry_loss():
    tok = text_tokenizer()
    data = MaskedLMDataset("the quick brown fox jumps over the lazy dog. " * 40, tok)
    x, y = data.get_batch("train", 4, 32, np.random.default_rng(0))
    chosen = y != -100
    assert chosen.any() and (~chosen).any()
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16,
                          causal=False))
    logits, loss = model(x, y)
    logits.retain_grad()
    loss.backward()
    grad = np.abs(backend.to_numpy(logits.grad)).sum(-1)
    assert np.all(grad[~chosen] == 0) and np.all(grad[chosen] > 0)
    z = backend.to_numpy(logits.data).astype(np.float64)  # the loss by hand, chosen positions only
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    assert loss.item() == pytest.approx(-logp[chosen, y[chosen]].mean(), rel=1e-4)


def test_mask_token_must_be_in_the_vocabulary_and_absent_from_the_text():
    with pytest.raises(ValueError, match="mask_token"):
        CharTokenizer("abc", mask_token="z")
    tok = text_tokenizer()
    with pytest.raises(ValueError, match="contains the mask token"):
        MaskedLMDataset("abc" + tok.mask_token, tok)
    with pytest.raises(ValueError, match="mask_token"):
        MaskedLMDataset("abc", CharTokenizer("abc"))
    # an old vocabulary round-trips unchanged, and a new one keeps its mask token
    assert CharTokenizer.from_dict({"chars": "ab", "unk_token": None}).mask_token is None
    assert CharTokenizer.from_dict(tok.to_dict()).mask_token_id == tok.mask_token_id


@pytest.mark.parametrize("causal", [True, False])
def test_encoder_sees_later_tokens_and_decoder_does_not(causal):
    config = GPTConfig(vocab_size=20, block_size=10, n_layer=2, n_head=2, n_embd=16, causal=causal)
    for model in (GPT(config, seed=1), GPTForTokenClassification(config, 5, seed=1)):
        model.eval()
        x = np.random.default_rng(0).integers(0, 20, size=(1, 10))
        x2 = x.copy()
        x2[0, 7] = (x2[0, 7] + 1) % 20  # change a later token
        a, b = backend.to_numpy(model(x)[0].data), backend.to_numpy(model(x2)[0].data)
        early_changed = not np.allclose(a[0, :7], b[0, :7])
        assert early_changed == (not causal)
        assert not np.allclose(a[0, 7], b[0, 7])  # the position itself always changes


def test_token_classification_head_gives_one_label_per_position():
    config = GPTConfig(vocab_size=12, block_size=6, n_layer=1, n_head=2, n_embd=8, causal=False)
    model = GPTForTokenClassification(config, 4, seed=0)
    x = np.random.default_rng(0).integers(0, 12, size=(3, 6))
    labels = np.random.default_rng(1).integers(0, 4, size=(3, 6))
    labels[:, -2:] = -100
    logits, loss = model(x, labels)
    assert logits.shape == (3, 6, 4) and np.isfinite(loss.item())
    assert "classifier.weight" in dict(model.named_parameters())
