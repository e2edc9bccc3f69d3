"""The NER corpus: tags align with entities, splits share no entity, and LoRA learns it."""
import numpy as np
import pytest

from lora_numpy.data import NERCorpus, bio_tags
from lora_numpy.data.ner import SPLITS, TEMPLATES, entity_pools, fill_template
from lora_numpy.metrics import bio_entities


@pytest.mark.parametrize("template", TEMPLATES)
def test_bio_tags_align_with_entity_spans(template):
    pools = entity_pools(0)["train"]
    rng = np.random.default_rng(0)
    for _ in range(20):
        text, spans = fill_template(template, pools, rng)
        tags = bio_tags(text, spans)
        assert len(tags) == len(text)
        # reading the tags back gives exactly the spans, and each span holds its entity string
        assert bio_entities(tags) == [(k, s, e - 1) for s, e, k in spans]
        for start, end, kind in spans:
            assert text[start:end] in pools[kind]
        outside = set(range(len(text))) - {i for s, e, _ in spans for i in range(s, e)}
        assert all(tags[i] == "O" for i in outside)


def test_splits_share_no_entity_string():
    corpus = NERCorpus(n_train=2000, n_val=300, n_test=300)
    seen = {s: {e.text[a:b] for e in corpus.sentences[s] for a, b, _ in e.spans} for s in SPLITS}
    assert not seen["train"] & seen["test"]
    assert not seen["train"] & seen["val"]
    assert not seen["val"] & seen["test"]
    pools = entity_pools(0)
    for kind in pools["train"]:
        assert not set(pools["train"][kind]) & set(pools["test"][kind])
    # no first name or surname is shared either
    names = {s: {w for p in pools[s]["PER"] for w in p.split()} for s in SPLITS}
    assert not names["train"] & names["test"]


def test_labels_match_tags_and_padding_is_ignored():
    corpus = NERCorpus(n_train=50, n_val=10, n_test=10)
    x, labels = corpus.examples("test")
    for row, e in enumerate(corpus.sentences["test"]):
        assert corpus.tokenizer.decode(x[row, :len(e.text)]) == e.text
        assert [corpus.label_names[i] for i in labels[row, :len(e.text)]] == bio_tags(e.text, e.spans)
        assert np.all(labels[row, len(e.text):] == -100)


def test_lora_fine_tune_learns_ner_end_to_end():
    from lora_numpy.nlp_tasks import NERTask, finetune, pretrain_base
    from lora_numpy.recipes import ModelSize
    size = ModelSize(n_layer=1, n_head=2, n_embd=32)
    base, _ = pretrain_base(causal=False, steps=60, size=size, batch_size=16, lr=1e-2, progress=False)
    task = NERTask(NERCorpus(n_train=300, n_val=20, n_test=60))
    before = task.evaluate(task.make_model(base))
    result = finetune(task, base, "lora", steps=100, batch_size=16, lr=2e-2)
    assert result.trainable_params < result.all_params / 2
    # A base pretrained for seconds is a poor start for LoRA (it cannot rewrite the body); what a
    # few seconds must show is that the adapters and the head learn.
    losses = [h["loss"] for h in result.history]
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10])
    assert result.metrics["token_accuracy"] > before["token_accuracy"] + 0.1
    assert set(result.metrics) == {"entity_f1", "entity_precision", "entity_recall", "token_accuracy"}
