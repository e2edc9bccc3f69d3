"""PEFT's adapter files: the keys, shapes and config fields PEFT writes, several adapters in
subfolders, and every bad file refused with a message naming it, before the model changes."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lora_numpy import backend
from lora_numpy.checkpoint import snapshot
from lora_numpy.models import GPT, GPTConfig
from lora_numpy.peft import LoraConfig, PeftModel, get_peft_model

TINY = dict(vocab_size=15, block_size=16, n_layer=2, n_head=2, n_embd=16)
# the fields PEFT 0.21 writes for a LoRA adapter that this package writes too (PEFT adds more,
# all at their defaults; a file holding those loads here as well)
CONFIG_FIELDS = {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
                 "init_lora_weights", "use_rslora", "use_dora", "bias", "modules_to_save",
                 "fan_in_fan_out", "rank_pattern", "alpha_pattern", "layers_to_transform",
                 "layers_pattern", "lora_bias", "exclude_modules", "base_model_name_or_path",
                 "revision", "inference_mode"}


def gpt():
    return GPT(GPTConfig(**TINY), 0)


def x():
    return np.random.default_rng(0).integers(0, 15, (2, 6))


def trained(config, seed=3):
    peft = get_peft_model(gpt(), config)
    rng = np.random.default_rng(seed)
    for _, p in peft.base_model.named_parameters():
        if p.requires_grad:
            p.data[...] = rng.normal(0, 0.3, p.shape).astype(p.dtype)
    return peft


def test_keys_shapes_and_config_fields_are_peft_s(tmp_path):
    peft = trained(LoraConfig(r=2, lora_alpha=4, target_modules=("q_proj", "wte"), use_dora=False))
    peft.add_adapter("dora", LoraConfig(r=3, target_modules=("fc1",), use_dora=True))
    peft.save_pretrained(tmp_path / "ad")
    arrays = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in arrays.items()} == {
        "base_model.model.wte.lora_embedding_A": (2, 15),
        "base_model.model.wte.lora_embedding_B": (16, 2),
        "base_model.model.blocks.0.attn.q_proj.lora_A.weight": (2, 16),
        "base_model.model.blocks.0.attn.q_proj.lora_B.weight": (16, 2),
        "base_model.model.blocks.1.attn.q_proj.lora_A.weight": (2, 16),
        "base_model.model.blocks.1.attn.q_proj.lora_B.weight": (16, 2)}
    sub = load_file(str(tmp_path / "ad" / "dora" / "adapter_model.safetensors"))  # a subfolder per name
    assert {k: v.shape for k, v in sub.items()} == {
        f"base_model.model.blocks.{i}.mlp.fc1.{k}": s for i in (0, 1)
        for k, s in (("lora_A.weight", (3, 16)), ("lora_B.weight", (64, 3)), ("lora_magnitude_vector", (64,)))}
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert set(config) == CONFIG_FIELDS
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["target_modules"] == ["q_proj", "wte"]
    assert json.loads((tmp_path / "ad" / "dora" / "adapter_config.json").read_text())["use_dora"] is True


def test_roundtrip_of_two_adapters_with_load_adapter(tmp_path):
    peft = trained(LoraConfig(r=2, target_modules=("q_proj", "wte")))
    peft.add_adapter("dora", LoraConfig(r=3, target_modules=("fc1",), use_dora=True))
    for _, layer in peft.lora_layers():
        for p in layer.adapter_params("dora"):
            p.data[...] += 0.1
    expected = {}
    for name in ("default", "dora"):
        peft.set_adapter(name)
        expected[name] = backend.to_numpy(peft(x())[0].data)
    peft.save_pretrained(tmp_path / "ad")
    loaded = PeftModel.from_pretrained(gpt(), tmp_path / "ad")
    loaded.load_adapter(tmp_path / "ad" / "dora", "dora")
    for name in ("default", "dora"):
        loaded.set_adapter(name)
        np.testing.assert_allclose(backend.to_numpy(loaded(x())[0].data), expected[name], rtol=1e-6, atol=1e-6)


def test_nan_refused_on_save_and_on_load_naming_the_key(tmp_path):
    peft = trained(LoraConfig(r=2))
    peft.save_pretrained(tmp_path / "ad")
    peft.base_model.blocks[0].attn.q_proj.lora_B["default"].weight.data[0, 0] = np.nan
    with pytest.raises(ValueError, match="q_proj.lora_B"):
        peft.save_pretrained(tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_model.safetensors"
    arrays = load_file(str(path))  # the good save survived the refusal
    arrays["base_model.model.blocks.1.attn.v_proj.lora_A.weight"][0, 0] = np.inf
    save_file(arrays, str(path))
    with pytest.raises(ValueError, match="v_proj.lora_A"):
        PeftModel.from_pretrained(gpt(), tmp_path / "ad")


@pytest.mark.parametrize("damage", ["truncate", "foreign"])
def test_broken_weights_file_named(tmp_path, damage):
    trained(LoraConfig(r=2)).save_pretrained(tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"PK\x03\x04 a zip file")
    model = gpt()
    before = snapshot(model)
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        PeftModel.from_pretrained(model, tmp_path / "ad")
    assert all(np.array_equal(before[k], v) for k, v in snapshot(model).items())


@pytest.mark.parametrize("edit, match", [
    ({"use_rslora": "false"}, "use_rslora"), ({"peft_type": "IA3"}, "peft_type"),
    ({"my_key": 1}, "my_key"), ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
    ({"lora_alpha": 1e400}, "lora_alpha"),
])
def test_bad_config_refused_naming_the_key(tmp_path, edit, match):
    trained(LoraConfig(r=2)).save_pretrained(tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}).replace("Infinity", "1e400"))
    with pytest.raises((TypeError, ValueError), match=match):
        PeftModel.from_pretrained(gpt(), tmp_path / "ad")


def test_peft_s_own_extra_keys_at_default_are_accepted(tmp_path):
    trained(LoraConfig(r=2)).save_pretrained(tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_config.json"
    extra = {"auto_mapping": None, "peft_version": "0.21.2", "megatron_core": "megatron.core",
             "loftq_config": {}, "use_qalora": False, "qalora_group_size": 16, "eva_config": None}
    path.write_text(json.dumps({**json.loads(path.read_text()), **extra}))
    PeftModel.from_pretrained(gpt(), tmp_path / "ad")


def test_wrong_shapes_refused_before_the_model_changes(tmp_path):
    trained(LoraConfig(r=2)).save_pretrained(tmp_path / "ad")
    model = GPT(GPTConfig(**{**TINY, "n_embd": 24}), 0)
    before = snapshot(model)
    with pytest.raises(ValueError, match="shape mismatches"):
        PeftModel.from_pretrained(model, tmp_path / "ad")
    assert snapshot(model).keys() == before.keys()


def test_missing_file_named(tmp_path):
    trained(LoraConfig(r=2)).save_pretrained(tmp_path / "ad")
    (tmp_path / "ad" / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        PeftModel.from_pretrained(gpt(), tmp_path / "ad")
