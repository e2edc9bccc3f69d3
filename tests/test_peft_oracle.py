"""Optional oracle: Hugging Face PEFT itself. An adapter saved here loads with
``peft.PeftModel.from_pretrained`` onto a PyTorch twin of the GPT (same module names) and gives
the same outputs; an adapter saved by PEFT loads here and gives PEFT's outputs. LoRA on
Linear and Embedding layers, rsLoRA, and DoRA. Skipped where torch or peft is missing."""
import numpy as np
import pytest

from lora_numpy import backend
from lora_numpy.models import GPT, GPTConfig
from lora_numpy.peft import LoraConfig, PeftModel, get_peft_model

pytestmark = pytest.mark.slow  # importing torch and peft alone takes ~10 s
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
nn = torch.nn

CFG = GPTConfig(vocab_size=15, block_size=16, n_layer=2, n_head=2, n_embd=16)


class Attn(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, c = x.shape
        heads = lambda y: y.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        y = nn.functional.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)),
                                                       heads(self.v_proj(x)), is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = nn.LayerNorm(d), Attn(d, n_head), nn.LayerNorm(d), MLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    """The same GPT in PyTorch, with the same module names, so PEFT finds the same targets."""

    def __init__(self, c):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(c.vocab_size, c.n_embd), nn.Embedding(c.block_size, c.n_embd)
        self.blocks = nn.ModuleList(Block(c.n_embd, c.n_head) for _ in range(c.n_layer))
        self.ln_f, self.lm_head = nn.LayerNorm(c.n_embd), nn.Linear(c.n_embd, c.vocab_size, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def ours():
    model = GPT(CFG, 0)
    rng = np.random.default_rng(1)
    for _, p in model.named_parameters():
        p.data[...] = (p.data + rng.normal(0, 0.2, p.shape)).astype(p.dtype)
    return model


def twin_of(model):
    twin = TorchGPT(CFG)
    twin.load_state_dict({k: torch.from_numpy(backend.to_numpy(v).copy()) for k, v in model.state_dict().items()})
    return twin.eval()


IDS = np.random.default_rng(0).integers(0, 15, (3, 9))
CONFIGS = [dict(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "wte"], use_rslora=True),
           dict(r=3, lora_alpha=6, target_modules=["q_proj", "fc1"], use_dora=True)]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_adapter_saved_here_loads_in_peft(tmp_path, kwargs):
    model = get_peft_model(ours(), LoraConfig(init_lora_weights=False, **kwargs), seed=3)
    for _, layer in model.lora_layers():  # nonzero B everywhere (an embedding's A starts at 0)
        for p in layer.adapter_params("default"):
            p.data[...] += np.random.default_rng(p.numel()).normal(0, 0.1, p.shape).astype(p.dtype)
    expected = backend.to_numpy(model(IDS)[0].data)
    twin = twin_of(ours())
    model.save_pretrained(tmp_path / "ad")
    theirs = peft.PeftModel.from_pretrained(twin, str(tmp_path / "ad")).eval()
    with torch.no_grad():
        got = theirs(torch.from_numpy(IDS)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_adapter_saved_by_peft_loads_here(tmp_path, kwargs):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(twin_of(ours()), peft.LoraConfig(init_lora_weights=False, **kwargs))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
        expected = theirs.eval()(torch.from_numpy(IDS)).numpy()
    theirs.save_pretrained(str(tmp_path / "ad"))
    loaded = PeftModel.from_pretrained(ours(), tmp_path / "ad")
    np.testing.assert_allclose(backend.to_numpy(loaded(IDS)[0].data), expected, rtol=1e-4, atol=1e-4)
