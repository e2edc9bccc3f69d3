"""Bad input is refused early with a clear error: one table, one row per bad input.

A row is ``case(id, call, error, names)``: ``call(tmp_path)`` must raise ``error`` (or a
subclass) with ``names`` (the bad value, the field or the file) in its message. The table is
grouped by floor: engine, models, files, checkpoints, training, PEFT, adapter files, and the
command line (whose rows raise ``CliError`` for exit code 2 with ``error: ...`` on stderr).
"""
import contextlib
import io
import os
import re
from unittest import mock

import numpy as np
import pytest

from lora_numpy import Tensor
from lora_numpy import cli
from lora_numpy import functional as F
from lora_numpy import io as lio
from lora_numpy.checkpoint import load_model, save_model
from lora_numpy.models import GPT, GPTConfig, GPTForSequenceClassification
from lora_numpy.nn import Dropout, Embedding, LayerNorm, Linear, Module, ModuleList
from lora_numpy.optim import SGD, set_lr
from lora_numpy.peft import LoraConfig, PeftModel, get_peft_model
from lora_numpy.train import TrainConfig, train


def case(id, call, error, names):
    return pytest.param(call, error, names, id=id)


TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)


def f32(*shape):
    return Tensor(np.ones(shape, np.float32), requires_grad=True)


def gpt():
    return GPT(TINY, seed=0)


def classifier():
    return GPTForSequenceClassification(TINY, num_labels=3, seed=0)


IDS = np.ones((2, 5), dtype=np.int64)

# ---- engine: tensors, functional ops, layers ---------------------------------------------------
ENGINE = [
    case("tensor/int-requires-grad", lambda _: Tensor(np.arange(3), requires_grad=True), TypeError, "int64"),
    case("tensor/tensor-exponent", lambda _: f32(2) ** f32(2), TypeError, "Tensor"),
    case("tensor/matmul-shapes", lambda _: f32(2, 3) @ f32(4, 2), ValueError, "(2, 3) @ (4, 2)"),
    case("tensor/backward-non-scalar", lambda _: (f32(3) * 2).backward(), RuntimeError, "(3,)"),
    case("tensor/backward-grad-shape", lambda _: (f32(3) * 2).backward(np.ones(2)), ValueError, "(2,)"),
    case("tensor/backward-without-grad", lambda _: Tensor(1.0).backward(), RuntimeError,
         "does not require grad"),
    case("cross_entropy/float-targets", lambda _: F.cross_entropy(f32(2, 4), np.array([0.0, 1.0], np.float32)),
         TypeError, "float32"),
    case("cross_entropy/weight-length", lambda _: F.cross_entropy(f32(2, 4), np.array([0, 1]), weight=np.ones(3)),
         ValueError, "shape (3,)"),
    case("cross_entropy/target-out-of-range", lambda _: F.cross_entropy(f32(2, 4), np.array([0, 7])),
         ValueError, "[7]"),
    case("cross_entropy/all-ignored", lambda _: F.cross_entropy(f32(2, 4), np.array([-100, -100])),
         ValueError, "ignore_index=-100"),
    case("cross_entropy/all-weights-zero",
         lambda _: F.cross_entropy(f32(2, 4), np.array([1, 1]), weight=np.array([1.0, 0, 1, 1])),
         ValueError, "class weight 0"),
    case("cross_entropy/targets-shape", lambda _: F.cross_entropy(f32(2, 4), np.array([0, 1, 2])),
         ValueError, "(3,)"),
    case("layer_norm/weight-shape", lambda _: F.layer_norm(f32(2, 4), f32(3)), ValueError,
         "weight has shape (3,)"),
    case("layer_norm/bias-shape", lambda _: F.layer_norm(f32(2, 4), f32(4), f32(5)), ValueError,
         "bias has shape (5,)"),
    case("linear/features", lambda _: F.linear(f32(2, 5), f32(3, 4)), ValueError, "5 features"),
    case("embedding/float-ids", lambda _: F.embedding(np.array([0.0, 1.0]), f32(5, 2)), TypeError, "float64"),
    case("embedding/id-out-of-range", lambda _: F.embedding(np.array([0, 9]), f32(5, 2)), IndexError, "9"),
    case("dropout/p-one", lambda _: F.dropout(f32(3), 1.0, True, np.random.default_rng(0)), ValueError, "got 1.0"),
    case("attention/shapes", lambda _: F.scaled_dot_product_attention(f32(1, 3, 4), f32(1, 3, 5), f32(1, 3, 4)),
         ValueError, "(1, 3, 5)"),
    case("nn/Linear-zero-features", lambda _: Linear(0, 4), ValueError, "in_features must be a positive integer, got 0"),
    case("nn/Embedding-negative-dim", lambda _: Embedding(5, -1), ValueError, "embedding_dim"),
    case("nn/LayerNorm-eps-zero", lambda _: LayerNorm(4, eps=0.0), ValueError, "eps"),
    case("nn/Dropout-p", lambda _: Dropout(1.5), ValueError, "1.5"),
    case("nn/load_state_dict-shape", lambda _: Linear(3, 2).load_state_dict(
        {"weight": np.zeros((2, 4), np.float32), "bias": np.zeros(2, np.float32)}), RuntimeError, "(2, 4)"),
    case("nn/ModuleList-index", lambda _: ModuleList([Linear(2, 2)])[5], IndexError, "index 5"),
]

# ---- models -------------------------------------------------------------------------------------
MODEL = [
    case("GPTConfig/heads", lambda _: GPTConfig(n_embd=10, n_head=4), ValueError, "n_embd=10"),
    case("GPTConfig/dropout", lambda _: GPTConfig(dropout=1.0), ValueError, "1.0"),
    case("GPT/empty-sequence", lambda _: gpt()(np.zeros((2, 0), np.int64)), ValueError, "(2, 0)"),
    case("GPT/float-ids", lambda _: gpt()(np.zeros((2, 3))), ValueError, "float64"),
    case("GPT/too-long", lambda _: gpt()(np.zeros((1, 20), np.int64)), ValueError, "sequence length 20"),
    case("generate/top_k-zero", lambda _: gpt().generate(IDS, 2, top_k=0, rng=np.random.default_rng(0)),
         ValueError, "got 0"),
    case("generate/top_k-negative", lambda _: gpt().generate(IDS, 2, top_k=-3, rng=np.random.default_rng(0)),
         ValueError, "-3"),
    case("generate/temperature", lambda _: gpt().generate(IDS, 2, temperature=-1.0), ValueError, "-1.0"),
    case("generate/no-rng", lambda _: gpt().generate(IDS, 2), ValueError, "rng="),
    case("generate/empty-prompt", lambda _: gpt().generate(np.zeros((1, 0), np.int64), 2, temperature=0),
         ValueError, "(1, 0)"),
    case("classifier/length-zero", lambda _: classifier()(IDS, np.array([0, 5])), ValueError, "[0]"),
    case("classifier/length-past-sequence", lambda _: classifier()(IDS, np.array([3, 9])), ValueError, "[9]"),
    case("classifier/lengths-count", lambda _: classifier()(IDS, np.array([3])), ValueError, "2 integers"),
    case("classifier/float-lengths", lambda _: classifier()(IDS, np.array([3.0, 2.0])), ValueError, "float64"),
]


# ---- files: io ----------------------------------------------------------------------------------
def truncated_npz(tmp):
    lio.save_arrays(tmp / "trunc.npz", {"w": np.arange(100.0)})
    data = (tmp / "trunc.npz").read_bytes()
    (tmp / "trunc.npz").write_bytes(data[: len(data) // 2])
    return lio.load_arrays(tmp / "trunc.npz")


def text_as_npz(tmp):
    (tmp / "notes.npz").write_text("not an archive")
    return lio.load_arrays(tmp / "notes.npz")


def npy_as_npz(tmp):
    np.save(tmp / "single.npy", np.ones(3))
    return lio.load_arrays(tmp / "single.npy")


def nan_npz(tmp):
    np.savez(tmp / "nan.npz", w=np.array([1.0, np.nan]))
    return lio.load_arrays(tmp / "nan.npz")


def bad_json(tmp):
    (tmp / "bad.json").write_text('{"r": 4,')
    return lio.load_json(tmp / "bad.json")


def folder_over_a_file(tmp):
    (tmp / "taken").write_text("a file")
    with lio.atomic_directory(tmp / "taken"):
        pass


IO = [
    case("load_arrays/truncated", truncated_npz, ValueError, "trunc.npz is not a valid .npz"),
    case("load_arrays/foreign", text_as_npz, ValueError, "notes.npz is not a valid .npz"),
    case("load_arrays/npy", npy_as_npz, ValueError, "single array"),
    case("load_arrays/nan", nan_npz, ValueError, "array 'w' in"),
    case("load_arrays/missing", lambda tmp: lio.load_arrays(tmp / "missing.npz"), FileNotFoundError, "missing.npz"),
    case("save_arrays/object-dtype", lambda tmp: lio.save_arrays(tmp / "o.npz", {"obj": np.array([{}, 1], dtype=object)}),
         TypeError, "'obj'"),
    case("load_json/invalid", bad_json, ValueError, "bad.json is not valid JSON"),
    case("atomic_directory/over-a-file", folder_over_a_file, NotADirectoryError, "taken"),
]


# ---- files: checkpoints -------------------------------------------------------------------------
def save_nan_model(tmp):
    model = gpt()
    model.blocks[0].mlp.fc1.weight.data[0, 0] = np.nan
    save_model(tmp / "ckpt", model)


def save_over_user_files(tmp):
    (tmp / "mine.txt").write_text("keep me")
    save_model(tmp, gpt())


def saved_then(edit):
    """Save a good checkpoint, damage it with ``edit(folder)``, then load it."""
    def call(tmp):
        save_model(tmp / "ckpt", gpt())
        edit(tmp / "ckpt")
        return load_model(tmp / "ckpt")
    return call


def nan_in_model_npz(folder):
    arrays = lio.load_arrays(folder / "model.npz")
    arrays["wte.weight"][0, 0] = np.inf
    np.savez(folder / "model.npz", **arrays)


def truncate_model_npz(folder):
    data = (folder / "model.npz").read_bytes()
    (folder / "model.npz").write_bytes(data[:1000])


def wider_config(folder):
    meta = lio.load_json(folder / "config.json")
    meta["config"]["n_embd"] = 16
    lio.save_json(folder / "config.json", meta)


def unknown_model(folder):
    lio.save_json(folder / "config.json", {**lio.load_json(folder / "config.json"), "model": "BERT"})


CHECKPOINT = [
    case("save_model/nan", save_nan_model, ValueError, "blocks.0.mlp.fc1.weight"),
    case("save_model/not-a-gpt", lambda tmp: save_model(tmp / "m", Linear(2, 2)), TypeError, "Linear"),
    case("save_model/over-user-files", save_over_user_files, FileExistsError, "holds no config.json"),
    case("load_model/missing", lambda tmp: load_model(tmp / "nothing"), FileNotFoundError, "nothing"),
    case("load_model/inf-array", saved_then(nan_in_model_npz), ValueError, "'wte.weight'"),
    case("load_model/truncated", saved_then(truncate_model_npz), ValueError, "model.npz is not a valid .npz"),
    case("load_model/shapes-vs-config", saved_then(wider_config), RuntimeError, "shape mismatch"),
    case("load_model/unknown-model", saved_then(unknown_model), ValueError, "'BERT'"),
]


# ---- training -----------------------------------------------------------------------------------
class Regression(Module):
    def __init__(self):
        self.lin = Linear(3, 2, rng=np.random.default_rng(0))

    def forward(self, x, y):
        out = self.lin(Tensor(x))
        return out, ((out - Tensor(y)) ** 2).mean()


def batch(rng):
    x = rng.standard_normal((4, 3)).astype(np.float32)
    return x, x[:, :2]


QUICK = TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=0)


def frozen_model(_):
    model = Regression()
    model.requires_grad_(False)
    train(model, batch, QUICK, progress=False)


def resume_with(config, stop_at=None):
    """Save a 2-step run, then resume it under ``config`` (and ``stop_at``)."""
    def call(tmp):
        train(Regression(), batch, QUICK, checkpoint_dir=tmp / "run", progress=False)
        train(Regression(), batch, config, checkpoint_dir=tmp / "run", resume=True,
              stop_at=stop_at, progress=False)
    return call


def optimizer_missing_bias(_):
    model = Regression()
    train(model, batch, QUICK, optimizer=SGD([model.lin.weight], lr=0.1), progress=False)


def all_ignored_batch(_):
    model = GPT(TINY, seed=0)
    train(model, lambda rng: (IDS, np.full((2, 5), -100)), QUICK, progress=False)


TRAIN = [
    case("TrainConfig/steps", lambda _: TrainConfig(steps=0), ValueError, "0"),
    case("TrainConfig/lr", lambda _: TrainConfig(lr=0.0), ValueError, "lr must be > 0, got 0.0"),
    case("TrainConfig/warmup", lambda _: TrainConfig(steps=5, warmup_steps=9), ValueError, "got 9"),
    case("train/nothing-trainable", frozen_model, ValueError, "no parameter requires grad"),
    case("train/resume-without-folder", lambda _: train(Regression(), batch, QUICK, resume=True, progress=False),
         ValueError, "checkpoint_dir"),
    case("train/resume-empty-folder", lambda tmp: train(Regression(), batch, QUICK, checkpoint_dir=tmp,
                                                        resume=True, progress=False),
         FileNotFoundError, "train_state.json"),
    case("train/resume-changed-config", resume_with(TrainConfig(steps=2, batch_size=4, lr=2e-2, warmup_steps=0)),
         ValueError, "lr: saved 0.01, now 0.02"),
    case("train/resume-past-end", resume_with(QUICK, stop_at=1), ValueError, "step 2, past the requested end 1"),
    case("train/optimizer-misses-a-parameter", optimizer_missing_bias, ValueError, "missing ['lin.bias']"),
    case("train/all-ignored-batch", all_ignored_batch, ValueError, "every target equals ignore_index"),
    case("set_lr/count", lambda _: set_lr(SGD([{"params": [f32(2)]}, {"params": [f32(2)]}], lr=1.0), [1.0] * 3),
         ValueError, "3 learning rates for 2"),
]


# ---- PEFT: LoraConfig, get_peft_model, PeftModel --------------------------------------------------
QV = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])


def adapted():
    return get_peft_model(gpt(), QV, seed=0)


def adapt_twice(_):
    model = adapted()
    get_peft_model(model.base_model, LoraConfig(target_modules="all-linear"))


def save_after_merge(tmp):
    model = adapted()
    model.save_pretrained(tmp / "adapter")
    model.merge_and_unload()
    model.save_pretrained(tmp / "adapter")  # would overwrite the good adapter with an empty one


def save_diverged_adapter(tmp):
    model = adapted()
    model.base_model.blocks[0].attn.q_proj.lora_B["default"].weight.data[0, 0] = np.nan
    model.save_pretrained(tmp / "adapter")


PEFT = [
    case("LoraConfig/r-zero", lambda _: LoraConfig(r=0), ValueError, "got 0"),
    case("LoraConfig/r-float", lambda _: LoraConfig(r=2.5), ValueError, "got 2.5"),
    case("LoraConfig/alpha-inf", lambda _: LoraConfig(lora_alpha=float("inf")), ValueError, "lora_alpha"),
    case("LoraConfig/alpha-negative", lambda _: LoraConfig(lora_alpha=-1), ValueError, "got -1"),
    case("LoraConfig/dropout-one", lambda _: LoraConfig(lora_dropout=1.0), ValueError, "got 1.0"),
    case("LoraConfig/rslora-string", lambda _: LoraConfig(use_rslora="false"), TypeError, "'false'"),
    case("LoraConfig/init-typo", lambda _: LoraConfig(init_lora_weights="pisa"), ValueError, "'pisa'"),
    case("LoraConfig/pissa-with-dropout", lambda _: LoraConfig(init_lora_weights="pissa", lora_dropout=0.1),
         ValueError, "lora_dropout=0"),
    case("LoraConfig/bias", lambda _: LoraConfig(bias="some"), ValueError, "'some'"),
    case("LoraConfig/invalid-regex", lambda _: LoraConfig(target_modules=r"blocks\.(q_proj"), ValueError,
         "is not a valid regular expression"),
    case("LoraConfig/empty-targets", lambda _: LoraConfig(target_modules=[]), ValueError, "target_modules is empty"),
    case("LoraConfig/peft-type", lambda _: LoraConfig(peft_type="PREFIX_TUNING"), ValueError, "'PREFIX_TUNING'"),
    case("get_peft_model/unknown-target", lambda _: get_peft_model(gpt(), LoraConfig(target_modules=["query"])),
         ValueError, "('query',) matched no module"),
    case("get_peft_model/target-is-layernorm", lambda _: get_peft_model(gpt(), LoraConfig(target_modules=["ln_1"])),
         ValueError, "'blocks.0.ln_1' is a LayerNorm"),
    # a bare string is one name, not its letters: the message names ('score',)
    case("get_peft_model/modules_to_save-string", lambda _: get_peft_model(gpt(), LoraConfig(modules_to_save="score")),
         ValueError, "modules_to_save=('score',)"),
    case("get_peft_model/already-adapted", adapt_twice, ValueError, "already holds LoRA layers"),
    case("get_peft_model/adapter-name-dot", lambda _: get_peft_model(gpt(), QV, adapter_name="a.b"),
         ValueError, "'a.b'"),
    case("PeftModel/add-existing-adapter", lambda _: adapted().add_adapter("default", QV), ValueError, "'default'"),
    case("PeftModel/unknown-adapter", lambda _: adapted().set_adapter("other"), ValueError, "other"),
    case("save_pretrained/after-merge_and_unload", save_after_merge, ValueError, "refusing to write an empty adapter"),
    case("save_pretrained/nan", save_diverged_adapter, ValueError, "lora_B"),
]


# ---- files: adapter_config.json and adapter_model.safetensors --------------------------------------
def saved_adapter_then(edit):
    """Save a good adapter, damage it with ``edit(folder)``, then load it onto a fresh model."""
    def call(tmp):
        adapted().save_pretrained(tmp / "adapter")
        edit(tmp / "adapter")
        return PeftModel.from_pretrained(gpt(), tmp / "adapter")
    return call


def edit_config(**changes):
    def edit(folder):
        config = lio.load_json(folder / "adapter_config.json")
        lio.save_json(folder / "adapter_config.json", {**config, **changes})
    return edit


def raw_config(text_edit):
    """Edit the JSON text itself (for what json.dumps would not write, such as Infinity)."""
    def edit(folder):
        path = folder / "adapter_config.json"
        path.write_text(text_edit(path.read_text()))
    return edit


def truncate_safetensors(folder):
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])


def nan_in_safetensors(folder):
    from safetensors.numpy import load_file, save_file
    arrays = load_file(str(folder / "adapter_model.safetensors"))
    key = next(k for k in sorted(arrays) if "lora_A" in k)
    arrays[key][0, 0] = np.nan
    save_file(arrays, str(folder / "adapter_model.safetensors"))


def delete(name):
    return lambda folder: (folder / name).unlink()


ADAPTER_FILES = [
    case("adapter_config/rslora-string", saved_adapter_then(edit_config(use_rslora="false")), TypeError, "'false'"),
    case("adapter_config/alpha-infinity",
         saved_adapter_then(raw_config(lambda t: re.sub(r'"lora_alpha": [^,]+', '"lora_alpha": Infinity', t))),
         ValueError, "lora_alpha must be a finite number, got inf"),
    case("adapter_config/r-string", saved_adapter_then(edit_config(r="2")), ValueError, "got '2'"),
    case("adapter_config/unknown-key", saved_adapter_then(edit_config(lora_rank=4)), ValueError, "['lora_rank']"),
    case("adapter_config/peft-type", saved_adapter_then(edit_config(peft_type="PREFIX_TUNING")), ValueError,
         "'PREFIX_TUNING'"),
    case("adapter_config/unsupported-feature", saved_adapter_then(edit_config(fan_in_fan_out=True)), ValueError,
         "fan_in_fan_out=True"),
    case("adapter_config/invalid-regex", saved_adapter_then(edit_config(target_modules="(q_proj")), ValueError,
         "'(q_proj'"),
    case("adapter_config/not-an-object", saved_adapter_then(raw_config(lambda t: "[1, 2]")), ValueError, "list"),
    case("adapter_config/truncated", saved_adapter_then(raw_config(lambda t: t[: len(t) // 2])), ValueError,
         "adapter_config.json is not valid JSON"),
    case("adapter_config/rank-differs-from-arrays", saved_adapter_then(edit_config(r=4)), ValueError,
         "shape mismatches"),
    case("adapter_config/missing", saved_adapter_then(delete("adapter_config.json")), FileNotFoundError,
         "no adapter_config.json"),
    case("adapter_model/truncated", saved_adapter_then(truncate_safetensors), ValueError,
         "adapter_model.safetensors is not a valid safetensors file"),
    case("adapter_model/nan", saved_adapter_then(nan_in_safetensors), ValueError, "hold NaN or inf"),
]


# ---- the command line -----------------------------------------------------------------------------
class CliError(Exception):
    """What a refused command shows: exit code 2 and ``error: ...`` on stderr (argparse's own
    errors too), raised so that a CLI row reads like every other row."""


def _reached_work(*args, **kwargs):
    raise AssertionError("the command started working: a bad flag must be refused before any training")


def run_cli(*argv, setup=None):
    """``python -m lora_numpy ARGV`` in this process, with --out/--cache under tmp (a row's own
    flags come later and win). The work itself (pretrain, compare, the studies) is replaced by
    an error, so a row also proves its check runs before any training; a refused command
    creates no folder."""
    def call(tmp):
        if setup is not None:
            setup(tmp)
        folders = ["--out", str(tmp / "out")] + (["--cache", str(tmp / "cache")] if argv[0] == "compare" else [])
        before = sorted(p.name for p in tmp.iterdir())
        stderr = io.StringIO()
        with contextlib.ExitStack() as stack:
            for name in ("pretrain", "compare", "lowdata", "rank_study", "memory_study", "forgetting_study",
                         "variance_study", "budget_study"):
                stack.enter_context(mock.patch.object(cli, name, _reached_work))
            stack.enter_context(contextlib.redirect_stderr(stderr))
            try:
                code = cli.main([argv[0], *folders, "--quiet", *[a.format(tmp=tmp) for a in argv[1:]]])
            except SystemExit as exit:  # argparse's errors
                code = exit.code
        text = stderr.getvalue()
        assert sorted(p.name for p in tmp.iterdir()) == before, "a refused command left files behind"
        if code == 2 and "error: " in text and "Traceback" not in text:
            raise CliError(text.strip())
        raise AssertionError(f"exit code {code}, stderr: {text!r}")
    return call


def a_file(*parts):
    def setup(tmp):
        path = tmp.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"a file")
    return setup


def text_file(data: bytes):
    return lambda tmp: (tmp / "corpus.txt").write_bytes(data)


def user_files_in_out(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "mine.txt").write_text("keep me")


def live_lock(tmp):
    (tmp / ".out.lock").write_text(f"{os.getpid()}\n")  # this process: alive


CLI = [
    case("cli/compare-rank-zero", run_cli("compare", "--rank", "0"), CliError, "--rank must be >= 1, got 0"),
    case("cli/compare-rank-above-width", run_cli("compare", "--rank", "80", "--n-embd", "64"), CliError,
         "--rank 80 is larger than the model width --n-embd 64"),
    case("cli/compare-alpha-zero", run_cli("compare", "--alpha", "0"),
         CliError, "--alpha must be a finite number > 0, got 0.0"),
    case("cli/compare-alpha-inf", run_cli("compare", "--alpha", "inf"), CliError, "got inf"),
    case("cli/compare-alpha-nan", run_cli("compare", "--alpha", "nan"), CliError, "got nan"),
    case("cli/compare-unknown-target-module", run_cli("compare", "--target-modules", "query", "v_proj"), CliError,
         "--target-modules query: no such layer in this model; choose among wte wpe q_proj"),
    case("cli/compare-target-module-layernorm", run_cli("compare", "--target", "sum", "--target-modules", "ln_1"),
         CliError, "--target-modules ln_1: no such layer"),
    case("cli/compare-steps-zero", run_cli("compare", "--steps", "0"), CliError, "--steps must be >= 1, got 0"),
    case("cli/compare-batch-size-zero", run_cli("compare", "--batch-size", "0"),
         CliError, "--batch-size must be >= 1, got 0"),
    case("cli/compare-base-steps-negative", run_cli("compare", "--base-steps", "-5"), CliError, "got -5"),
    case("cli/compare-eval-every-negative", run_cli("compare", "--eval-every", "-1"),
         CliError, "--eval-every must be >= 0, got -1"),
    case("cli/compare-max-train-zero", run_cli("compare", "--max-train", "0"),
         CliError, "--max-train must be >= 1, got 0"),
    case("cli/compare-seed-negative", run_cli("compare", "--seeds", "0", "-1"),
         CliError, "--seeds takes integers >= 0, got 0 -1"),
    case("cli/compare-seed-repeated", run_cli("compare", "--seeds", "3", "3"), CliError, "--seeds repeats a seed: 3 3"),
    case("cli/compare-method-repeated", run_cli("compare", "--methods", "lora", "lora"), CliError, "['lora', 'lora']"),
    case("cli/compare-lr-negative", run_cli("compare", "--lr-lora", "-0.01"),
         CliError, "--lr-lora must be a finite learning rate > 0, got -0.01"),
    case("cli/compare-lr-inf", run_cli("compare", "--lr-full", "inf"), CliError, "--lr-full"),
    case("cli/compare-heads-do-not-divide-width", run_cli("compare", "--n-embd", "30"), CliError,
         "--n-embd 30 must be divisible by --n-head 4"),
    case("cli/compare-no-layers", run_cli("compare", "--n-layer", "0"), CliError, "--n-layer must be >= 1, got 0"),
    case("cli/compare-out-is-a-file", run_cli("compare", "--out", "{tmp}/taken", setup=a_file("taken")), CliError,
         "taken is a file, not a folder"),
    case("cli/compare-cache-under-a-file", run_cli("compare", "--cache", "{tmp}/taken/cache", setup=a_file("taken")),
         CliError, "--cache"),
    case("cli/compare-out-in-use", run_cli("compare", setup=live_lock),
         CliError, f"in use by another run (pid {os.getpid()}"),
    case("cli/compare-unknown-target-task", run_cli("compare", "--target", "poetry"), CliError, "'poetry'"),
    case("cli/compare-rank-not-an-integer", run_cli("compare", "--rank", "4.5"), CliError, "'4.5'"),
    case("cli/pretrain-steps-zero", run_cli("pretrain", "--steps", "0"), CliError, "--steps must be >= 1, got 0"),
    case("cli/pretrain-lr-nan", run_cli("pretrain", "--lr", "nan"),
         CliError, "--lr must be a finite learning rate > 0, got nan"),
    case("cli/pretrain-seed-negative", run_cli("pretrain", "--seed", "-1"),
         CliError, "--seed takes integers >= 0, got -1"),
    case("cli/pretrain-text-file-without-task-text",
         run_cli("pretrain", "--text-file", "{tmp}/corpus.txt", setup=text_file(b"words " * 500)), CliError,
         "only applies to --task text (got --task add)"),
    case("cli/pretrain-text-file-missing", run_cli("pretrain", "--task", "text", "--text-file", "{tmp}/none.txt"),
         CliError, "none.txt is not a file (no such path)"),
    case("cli/pretrain-text-file-is-a-folder", run_cli("pretrain", "--task", "text", "--text-file", "{tmp}"),
         CliError, "is not a file"),
    case("cli/pretrain-text-file-not-utf8",
         run_cli("pretrain", "--task", "text", "--text-file", "{tmp}/corpus.txt", setup=text_file(b"caf\xe9 " * 500)),
         CliError, "corpus.txt is not UTF-8 text (byte 3"),
    case("cli/pretrain-text-file-too-short",
         run_cli("pretrain", "--task", "text", "--text-file", "{tmp}/corpus.txt", setup=text_file(b"short")),
         CliError, "corpus.txt is too short"),
    case("cli/pretrain-out-holds-user-files", run_cli("pretrain", setup=user_files_in_out), CliError,
         "holds files but no config.json"),
    case("cli/pretrain-out-is-a-file", run_cli("pretrain", "--out", "{tmp}/taken", setup=a_file("taken")), CliError,
         "taken is a file, not a folder"),
    case("cli/pretrain-out-under-a-file", run_cli("pretrain", "--out", "{tmp}/taken/base", setup=a_file("taken")),
         CliError, "taken is a file, not a folder"),
    case("cli/pretrain-out-in-use", run_cli("pretrain", setup=live_lock), CliError, "in use by another run"),
    case("cli/pretrain-task-sum", run_cli("pretrain", "--task", "sum"), CliError, "'sum'"),
]

CASES = ENGINE + MODEL + IO + CHECKPOINT + TRAIN + PEFT + ADAPTER_FILES + CLI


@pytest.mark.parametrize("call, error, names", CASES)
def test_bad_input_is_refused_naming_it(call, error, names, tmp_path):
    with pytest.raises(error) as info:
        call(tmp_path)
    message = str(info.value)
    assert names in message, f"the message does not name {names!r}: {message}"
    assert "allow_pickle" not in message  # NumPy's advice to unpickle is never passed on


def test_the_table_is_large_and_its_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 40
