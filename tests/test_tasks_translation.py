"""English -> French number words as supervised fine-tuning: the rules, the response-only
loss, greedy decoding to a stop token, and a LoRA fine-tune end to end."""
import numpy as np
import pytest

from lora_numpy.data import NumberTranslationTask, english_words, french_words


@pytest.mark.parametrize("n, english, french", [
    (1, "one", "un"),
    (17, "seventeen", "dix-sept"),
    (21, "twenty-one", "vingt et un"),
    (71, "seventy-one", "soixante et onze"),
    (77, "seventy-seven", "soixante-dix-sept"),
    (80, "eighty", "quatre-vingts"),
    (81, "eighty-one", "quatre-vingt-un"),
    (91, "ninety-one", "quatre-vingt-onze"),
    (97, "ninety-seven", "quatre-vingt-dix-sept"),
    (100, "one hundred", "cent"),
    (200, "two hundred", "deux cents"),
    (201, "two hundred one", "deux cent un"),
    (1000, "one thousand", "mille"),
    (2080, "two thousand eighty", "deux mille quatre-vingts"),
    (21000, "twenty-one thousand", "vingt et un mille"),
    (80000, "eighty thousand", "quatre-vingt mille"),
    (200000, "two hundred thousand", "deux cent mille"),
    (300200, "three hundred thousand two hundred", "trois cent mille deux cents"),
    (999999, "nine hundred ninety-nine thousand nine hundred ninety-nine",
     "neuf cent quatre-vingt-dix-neuf mille neuf cent quatre-vingt-dix-neuf"),
])
def test_number_words(n, english, french):
    assert english_words(n) == english and french_words(n) == french


def test_out_of_range_is_refused():
    with pytest.raises(ValueError, match="1..999999"):
        french_words(1_000_000)


def test_response_only_loss_ignores_every_prompt_position():
    task = NumberTranslationTask(max_value=5000, n_train=200, n_val=10, n_test=10)
    numbers = task.numbers["train"][:32]
    x, y = task.sequences(numbers, response_only=True)
    _, y_all = task.sequences(numbers, response_only=False)
    tok = task.tokenizer
    for row, n in enumerate(numbers):
        p, r = len(task.prompt(n)), len(task.response(n))
        # y[t] is token t + 1: targets 0..p-2 belong to the prompt, p-1..p+r-2 to the response
        assert np.all(y[row, :p - 1] == -100)
        assert tok.decode(y[row, p - 1:p + r - 1]) == task.response(n)  # ends with the stop token
        assert np.all(y[row, p + r - 1:] == -100)                       # padding
        assert tok.decode(y_all[row, :p + r - 1]) == (task.prompt(n) + task.response(n))[1:]
        assert tok.decode(x[row, :p + r - 1]) == (task.prompt(n) + task.response(n))[:-1]


def test_splits_are_disjoint():
    task = NumberTranslationTask(max_value=3000, n_train=2000, n_val=300, n_test=300)
    sets = {k: set(v.tolist()) for k, v in task.numbers.items()}
    assert not sets["train"] & sets["test"] and not sets["train"] & sets["val"]


def test_greedy_decoding_stops_at_the_stop_token():
    from lora_numpy.evaluate import greedy_until_stop
    from lora_numpy.models import GPT, GPTConfig

    class Scripted(GPT):
        """Emits 'ab' and then the stop token 0, whatever the prompt."""
        def forward(self, idx, targets=None):
            from lora_numpy.tensor import Tensor
            ids = np.asarray(idx)
            logits = np.zeros(ids.shape + (5,), dtype=np.float32)
            # next token after a token v: 1 ('a') after the prompt's 4, 2 after 1, 0 after 2
            nxt = np.select([ids == 4, ids == 1, ids == 2], [1, 2, 0], 3)
            np.put_along_axis(logits, nxt[..., None], 1.0, axis=-1)
            return Tensor(logits), None

    model = Scripted(GPTConfig(vocab_size=5, block_size=16, n_layer=1, n_head=1, n_embd=4))
    out = greedy_until_stop(model, [np.array([3, 3, 4]), np.array([4])], stop_id=0, max_new_tokens=6)
    assert [o.tolist() for o in out] == [[1, 2], [1, 2]]
    out = greedy_until_stop(model, [np.array([3, 3])], stop_id=0, max_new_tokens=4)
    assert out[0].tolist() == [3, 3, 3, 3]  # never stops: cut at max_new_tokens


def test_lora_fine_tune_of_translation_end_to_end():
    from lora_numpy.nlp_tasks import TranslateTask, finetune, pretrain_base
    from lora_numpy.recipes import ModelSize
    base, _ = pretrain_base(causal=True, steps=60, size=ModelSize(1, 2, 32), batch_size=16, lr=1e-2,
                            progress=False)
    task = TranslateTask(NumberTranslationTask(max_value=999, n_train=600, n_val=10, n_test=20))
    result = finetune(task, base, "lora", steps=80, batch_size=16, lr=2e-2, eval_limit=20)
    losses = [h["loss"] for h in result.history]
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:10])
    assert 0.0 <= result.metrics["exact_match"] <= 1.0 and result.metrics["chrf"] > 5
