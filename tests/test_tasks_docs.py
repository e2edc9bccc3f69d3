"""Documentation-section classification on real stdlib text, and the PEFT task-type mapping."""
import numpy as np
import pytest

from lora_numpy.data import DocSectionsTask
from lora_numpy.data.doc_sections import section_paragraphs


@pytest.fixture(scope="module")
def docs():
    return DocSectionsTask()


def test_paragraphs_have_one_label_and_splits_do_not_overlap(docs):
    pairs = section_paragraphs(max_chars=docs.block_size)
    texts = [t for t, _ in pairs]
    assert len(texts) == len(set(texts)) > 500
    sets = {s: set(v) for s, v in docs.texts.items()}
    assert not sets["train"] & sets["test"] and not sets["train"] & sets["val"]


def test_classes_are_imbalanced_and_weights_balance_them(docs):
    counts = docs.class_counts("train")
    assert counts.min() > 0 and counts.max() > 5 * counts.min()  # the manual's own imbalance
    w = docs.class_weights("train")
    assert np.allclose(w * counts, counts.sum() / docs.n_classes)  # each class weighs the same


def test_lora_fine_tune_of_docs_with_weighted_loss(docs):
    from lora_numpy.nlp_tasks import DocsTask, finetune, pretrain_base
    from lora_numpy.recipes import ModelSize
    base, _ = pretrain_base(causal=True, steps=20, size=ModelSize(1, 2, 32), batch_size=16, lr=1e-2,
                            progress=False)
    result = finetune(DocsTask(docs, class_weighted=True), base, "lora", steps=40, batch_size=16, lr=1e-2)
    assert set(result.metrics) == {"accuracy", "macro_f1", "precision", "recall"}
    assert len(result.metrics["recall"]) == docs.n_classes
    assert all(np.isfinite(h["loss"]) for h in result.history)
    # the weighted loss is the weighted mean of per-example losses, with the task's weights
    task, plain = DocsTask(docs, class_weighted=True), DocsTask(docs)
    model = task.make_model(base)
    x, lengths, labels = docs.get_batch("train", 64, np.random.default_rng(0))
    logits = model(x, lengths)[0].numpy().astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll, w = -logp[np.arange(64), labels], docs.class_weights()[labels]
    assert task.loss_fn(model, (x, lengths, labels)).item() == pytest.approx((w * nll).sum() / w.sum(), rel=1e-4)
    assert plain.loss_fn(model, (x, lengths, labels)).item() == pytest.approx(nll.mean(), rel=1e-4)


def test_peft_task_types_choose_the_head_that_trains():
    from lora_numpy.models import GPT, GPTConfig
    from lora_numpy.nlp_tasks import TASK_TYPES, NERTask, TranslateTask, prepare
    from lora_numpy.data import NERCorpus, NumberTranslationTask
    base = GPT(GPTConfig(vocab_size=106, block_size=136, n_layer=1, n_head=2, n_embd=16))
    ner = prepare(NERTask(NERCorpus(20, 5, 5)), base, "lora")
    trainable = {n for n, p in ner.base_model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert not any(n.startswith("transformer.lm_head") for n in trainable)
    lm = prepare(TranslateTask(NumberTranslationTask(999, 20, 5, 5)), base, "lora")
    trainable = {n for n, p in lm.base_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)  # CAUSAL_LM: adapters only
    assert TASK_TYPES["SEQ_CLS"].modules_to_save == ("score",)
