"""Floor 4: ``Module`` and ``Parameter``, PyTorch's way of organising weights.

A module's parameters and sub-modules are simply its attributes: assigning ``self.weight =
Parameter(...)`` or ``self.attn = CausalSelfAttention(...)`` registers them, in assignment
order. Names are dotted paths (``blocks.0.attn.q_proj.weight``), so a ``state_dict`` reads like
a PyTorch model's and LoRA can find its targets by name.
"""
from __future__ import annotations

from typing import NamedTuple

from .. import backend
from ..tensor import Tensor


class Parameter(Tensor):
    """A tensor that a module owns and an optimizer may train (``requires_grad=True``)."""

    def __init__(self, data, requires_grad: bool = True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self):
        return "Parameter" + super().__repr__()[len("Tensor"):]


class LoadResult(NamedTuple):
    missing_keys: list
    unexpected_keys: list


class Module:
    """Base class: parameters, sub-modules, train/eval mode, state dicts."""

    training = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    # ---- walking the tree -------------------------------------------------------------
    def _members(self):
        """(name, value) for what this module holds directly: its attributes. ``ModuleDict`` and
        ``ParameterDict`` hold theirs in a dict instead, so any string can name an entry."""
        return vars(self).items()

    def named_children(self):
        for name, value in self._members():
            if isinstance(value, Module):
                yield name, value

    def named_modules(self, prefix: str = ""):
        """Every module in the tree, this one first, with its dotted path ("" for the root)."""
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self):
        """(dotted name, Parameter) pairs; a parameter shared by two modules appears once."""
        seen = set()
        for module_name, module in self.named_modules():
            for name, value in module._members():
                if isinstance(value, Parameter) and id(value) not in seen:
                    seen.add(id(value))
                    yield (f"{module_name}.{name}" if module_name else name), value

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def get_submodule(self, path: str) -> "Module":
        module = self
        for part in path.split(".") if path else []:
            module = module[part] if isinstance(module, _Dict) else getattr(module, part)
        return module

    # ---- modes and gradients ----------------------------------------------------------
    def train(self, mode: bool = True) -> "Module":
        for _, module in self.named_modules():
            module.training = mode
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def requires_grad_(self, flag: bool = True) -> "Module":
        for p in self.parameters():
            p.requires_grad = flag
        return self

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def to(self, dtype) -> "Module":
        """Cast every parameter (float64 for gradient checks, float32 to train)."""
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = None
        return self

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ---- state dicts --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Name -> array. The arrays are the parameters' own (not copies), as in PyTorch."""
        return {name: p.data for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict, strict: bool = True) -> LoadResult:
        """Copy arrays into the parameters by name. With ``strict``, any missing key,
        unexpected key or shape mismatch is an error that lists them all; nothing is
        written unless everything fits."""
        own = dict(self.named_parameters())
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {own[k].shape}"
                      for k in own if k in state and tuple(state[k].shape) != own[k].shape]
        problems = (["shape mismatch: " + m for m in mismatched]
                    + ([f"missing keys: {missing}"] if missing and strict else [])
                    + ([f"unexpected keys: {unexpected}"] if unexpected and strict else []))
        if problems:
            raise RuntimeError(f"cannot load state dict into {type(self).__name__}:\n  "
                               + "\n  ".join(problems))
        for name, p in own.items():
            if name in state:
                p.data[...] = backend.asarray(state[name], dtype=p.dtype)
        return LoadResult(missing, unexpected)

    # ---- printing -----------------------------------------------------------------------
    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        children = [f"({name}): " + repr(child).replace("\n", "\n  ")
                    for name, child in self.named_children()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        return head + ")" if not children else head + "\n  " + "\n  ".join(children) + "\n)"


class ModuleList(Module):
    """A list of modules, named "0", "1", ... so that paths read ``blocks.3.attn``."""

    def __init__(self, modules=()):
        for module in modules:
            self.append(module)

    def append(self, module: Module) -> None:
        setattr(self, str(len(self)), module)

    def __len__(self):
        return sum(1 for _ in self.named_children())

    def __getitem__(self, i: int) -> Module:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for a ModuleList of {n} modules")
        return getattr(self, str(i % n))

    def __iter__(self):
        return (module for _, module in self.named_children())


class _Dict(Module):
    """Entries by string key, named by their key in paths (``lora_A.default.weight``)."""

    def __init__(self, entries=None):
        self._entries = {}
        for key, value in (entries or {}).items():
            self[key] = value

    def _members(self):
        return self._entries.items()

    def __setitem__(self, key: str, value) -> None:
        if not isinstance(key, str) or not key or "." in key:
            raise KeyError(f"key {key!r} must be a non-empty string without '.' (it becomes part "
                           "of a dotted parameter name)")
        self._entries[key] = value

    def __getitem__(self, key: str):
        return self._entries[key]

    def __delitem__(self, key: str) -> None:
        del self._entries[key]

    def __contains__(self, key) -> bool:
        return key in self._entries

    def __len__(self):
        return len(self._entries)

    def __iter__(self):
        return iter(self._entries)

    def keys(self):
        return self._entries.keys()

    def values(self):
        return self._entries.values()

    def items(self):
        return self._entries.items()


class ModuleDict(_Dict):
    """Sub-modules by name, as ``torch.nn.ModuleDict`` (PEFT keeps one LoRA factor per adapter)."""

    def __setitem__(self, key: str, module: Module) -> None:
        if not isinstance(module, Module):
            raise TypeError(f"ModuleDict holds modules, got {type(module).__name__} for {key!r}")
        super().__setitem__(key, module)


class ParameterDict(_Dict):
    """Parameters by name, as ``torch.nn.ParameterDict``."""

    def __setitem__(self, key: str, param: Parameter) -> None:
        if not isinstance(param, Parameter):
            raise TypeError(f"ParameterDict holds Parameters, got {type(param).__name__} for {key!r}")
        super().__setitem__(key, param)

    def extra_repr(self):
        return ", ".join(f"{k}: {tuple(p.shape)}" for k, p in self._entries.items())
