"""Floor 5: optimizers, gradient clipping and learning-rate schedules.

An optimizer turns the gradients that ``backward()`` left in ``p.grad`` into a change of
``p.data``; names and update rules follow ``torch.optim``, so what is learnt here carries over.
``p.data`` is updated in place (``-=``, ``out=``): references to a weight stay valid and no
second copy of it is made. ``p.grad`` never is: the engine may share one gradient array
between tensors, so a new array is assigned instead.

Checkpoint format of :meth:`Optimizer.state_dict` (storable in an ``.npz`` without pickle)::

    {"arrays":  {"<i>.<buffer>": np.ndarray, ...},      # e.g. "0.exp_avg", "3.momentum_buffer"
     "scalars": {"type": "AdamW",                        # the optimizer class
                 "param_groups": [{"lr": ..., ..., "params": [0, 1, ...]}, ...],
                 "state": {"<i>": {"step": 12}, ...}}}   # JSON-able: json.dumps(sd["scalars"])

``<i>`` numbers the trainable parameters in group order, as PyTorch does.
"""
from __future__ import annotations

import math

from . import backend, parallel
from .tensor import Tensor


class Optimizer:
    """Parameter groups plus per-parameter state; a subclass writes the update rule ``_update``.

    ``params`` is an iterable of tensors or a list of dicts ``{"params": [...], "lr": ...}``
    whose keys override ``defaults`` for that group. Tensors with ``requires_grad=False`` are
    dropped: a frozen weight gets no state, which is where LoRA saves optimizer memory.
    """

    def __init__(self, params, defaults: dict):
        if isinstance(params, Tensor):
            raise TypeError("params must be an iterable of Tensors or of dicts, got a single "
                            "Tensor; wrap it in a list")
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.defaults = defaults
        self.param_groups = [self._make_group(group) for group in groups]
        self.state: dict[Tensor, dict] = {}  # filled lazily, at a parameter's first step
        trainable = self._params()
        if not trainable:
            raise ValueError("optimizer got an empty parameter list: did you freeze every parameter?")
        if len({id(p) for p in trainable}) != len(trainable):
            raise ValueError("a parameter appears more than once in the parameter groups")

    def _make_group(self, group: dict) -> dict:
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} in a parameter group; "
                             f"{type(self).__name__} takes {sorted(self.defaults)}")
        params = [group["params"]] if isinstance(group["params"], Tensor) else group["params"]
        group = {**self.defaults, **group, "params": [p for p in params if p.requires_grad]}
        _check_hyperparameters(group)
        return group

    def _params(self) -> list:
        """Every trainable parameter, in group order (the order ``state_dict`` numbers them)."""
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self) -> None:
        """Forget the gradients: ``backward()`` accumulates, so clear them before each one."""
        for p in self._params():
            p.grad = None

    def step(self) -> None:
        """Update, in place, every trainable parameter that received a gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, self.state.setdefault(p, {}), group)

    def _update(self, p: Tensor, g, state: dict, group: dict) -> None:
        """Change ``p.data`` in place given its gradient ``g`` (same shape), its ``state``
        dict (empty at its first step) and its group's hyperparameters."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The optimizer as plain arrays and numbers (format in the module docstring)."""
        index = {id(p): i for i, p in enumerate(self._params())}
        arrays, state = {}, {}
        for p, entries in self.state.items():
            i = index[id(p)]
            for key, value in entries.items():
                if hasattr(value, "shape"):  # a copy: the live buffer keeps changing in place
                    arrays[f"{i}.{key}"] = backend.to_numpy(value).copy()
                else:
                    state.setdefault(str(i), {})[key] = value
        groups = [{**{k: v for k, v in group.items() if k != "params"},
                   "params": [index[id(p)] for p in group["params"]]} for group in self.param_groups]
        return {"arrays": arrays,
                "scalars": {"type": type(self).__name__, "param_groups": groups, "state": state}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what :meth:`state_dict` returned, onto this optimizer's own parameters."""
        scalars, arrays = state_dict["scalars"], state_dict["arrays"]
        if scalars["type"] != type(self).__name__:
            raise ValueError(f"this state was saved by {scalars['type']}, not {type(self).__name__}")
        saved_sizes = [len(group["params"]) for group in scalars["param_groups"]]
        sizes = [len(group["params"]) for group in self.param_groups]
        if saved_sizes != sizes:
            raise ValueError(f"the saved groups hold {saved_sizes} parameters but this optimizer's "
                             f"hold {sizes}: was it built from the same model and freezing?")
        for group, saved in zip(self.param_groups, scalars["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        params = self._params()
        self.state = {params[int(i)]: dict(entries) for i, entries in scalars["state"].items()}
        for name, value in arrays.items():
            i, key = name.split(".", 1)
            p = params[int(i)]
            if value.shape != p.shape:
                raise ValueError(f"saved {name} has shape {value.shape}, parameter {i} has {p.shape}")
            # xp.array copies onto the current device, so later in-place steps never touch `value`
            self.state.setdefault(p, {})[key] = backend.xp.array(value, dtype=p.dtype)


def _check_hyperparameters(group: dict) -> None:
    for key in ("lr", "weight_decay", "momentum", "eps"):  # whichever this optimizer has
        if group.get(key, 0.0) < 0:
            raise ValueError(f"{key} must be >= 0, got {group[key]}")
    if group.get("nesterov") and group["momentum"] <= 0:
        raise ValueError("nesterov=True needs a momentum > 0")
    if any(not 0.0 <= beta < 1.0 for beta in group.get("betas", ())):
        raise ValueError(f"betas must lie in [0, 1), got {group['betas']}")


class SGD(Optimizer):
    """Stochastic gradient descent, as ``torch.optim.SGD`` with ``dampening=0``.

    State per parameter (only when ``momentum > 0``): ``momentum_buffer``, shaped like it.
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      nesterov=nesterov))

    def _update(self, p, g, state, group):
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        if wd:
            g = g + wd * p.data  # L2 decay: ∇(½λ‖θ‖²) = λθ joins the gradient (a new array)
        if mu:
            buf = state.get("momentum_buffer")
            if buf is None:  # b₁ = g₁; a copy, since g may be the engine's shared array
                buf = state["momentum_buffer"] = g.copy()
            else:
                buf *= mu
                buf += g  # bₜ = μ bₜ₋₁ + gₜ
            g = g + mu * buf if group["nesterov"] else buf  # Nesterov looks ahead: g + μb
        p.data -= lr * g  # θ ← θ − η g


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as ``torch.optim.AdamW``.

    State per parameter: ``step`` (int), ``exp_avg`` m and ``exp_avg_sq`` v, shaped and typed
    like the parameter (float32 for a float32 weight).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _update(self, p, g, state, group):
        xp = backend.xp
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        if not state:
            state.update(step=0, exp_avg=xp.zeros_like(p.data), exp_avg_sq=xp.zeros_like(p.data))
        state["step"] += 1
        t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        bias1, bias2 = 1 - beta1 ** t, math.sqrt(1 - beta2 ** t)

        def band(theta, g, m, v):  # elementwise, so a large matrix runs in bands of rows
            if wd:  # decoupled: θ ← θ − ηλθ, applied to θ itself, not mixed into the moments
                theta *= 1 - lr * wd
            # One scratch array serves every intermediate; m, v and θ are updated in place.
            scratch = g * (1 - beta1)
            m *= beta1
            m += scratch  # m ← β₁m + (1−β₁)g
            xp.multiply(g, g, out=scratch)
            scratch *= 1 - beta2
            v *= beta2
            v += scratch  # v ← β₂v + (1−β₂)g²
            xp.sqrt(v, out=scratch)
            scratch /= bias2
            scratch += eps  # √v̂ + ε, with v̂ = v / (1−β₂ᵗ): v starts at 0, so early v is too small
            xp.divide(m, scratch, out=scratch)
            scratch *= lr / bias1  # η m̂ / (√v̂ + ε), with m̂ = m / (1−β₁ᵗ)
            theta -= scratch
        parallel.over_rows(band, p.data, g, m, v, align=1)  # elementwise: any cut, same bits


def param_groups_for_weight_decay(named_parameters, weight_decay: float) -> list:
    """Split ``(name, tensor)`` pairs into two groups, the nanoGPT convention: tensors with
    ndim >= 2 (matrices, embeddings) decay; ndim < 2 (biases, LayerNorm gains) do not, since
    shrinking a gain or an offset towards 0 is not a useful prior. Frozen tensors are skipped.
    """
    decay, no_decay = [], []
    for _, p in named_parameters:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def clip_grad_norm_(params, max_norm: float) -> float:
    """Rescale the gradients so their global L2 norm is at most ``max_norm`` (PyTorch's rule).

    Returns the norm before clipping, ‖g‖ = √(Σₚ ‖gₚ‖²) over every parameter with a gradient.
    Clipped gradients are new arrays: the engine may share a gradient array between tensors.
    """
    xp = backend.xp
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    # The norm of the per-tensor norms: one host sync for the whole model.
    total = float(xp.linalg.norm(xp.stack([xp.linalg.norm(p.grad.ravel()) for p in params])))
    coef = max_norm / (total + 1e-6)  # the 1e-6 keeps a zero gradient from dividing by 0
    if coef < 1.0:
        for p in params:
            p.grad = p.grad * coef
    return total


def cosine_schedule(step: int, max_steps: int, base_lr: float, warmup_steps: int = 0,
                    min_lr: float = 0.0) -> float:
    """The learning rate at ``step`` (counted from 0): linear warmup, then cosine decay.

    * ``step < warmup_steps``: ``base_lr · (step+1) / warmup_steps``, so step 0 already trains
      (at ``base_lr / warmup_steps``) and step ``warmup_steps - 1`` reaches ``base_lr``;
    * ``warmup_steps <= step <= max_steps``: ``min_lr + (base_lr − min_lr) · ½(1 + cos πr)``
      with ``r = (step − warmup_steps) / (max_steps − warmup_steps)``: ``base_lr`` at the end of
      warmup, the mean of the two at the midpoint, ``min_lr`` at ``max_steps``;
    * ``step > max_steps``: ``min_lr``.
    """
    if not 0 <= warmup_steps <= max_steps:
        raise ValueError(f"need 0 <= warmup_steps <= max_steps, got {warmup_steps} and {max_steps}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * ratio))


def set_lr(optimizer: Optimizer, lr) -> None:
    """Set the learning rate (call once per step with a schedule's value): a number gives every
    parameter group that rate; a list gives one rate per group, in ``param_groups`` order (groups
    with their own rates, e.g. LoRA+'s B matrices at a multiple of A's)."""
    rates = list(lr) if isinstance(lr, (list, tuple)) else [lr] * len(optimizer.param_groups)
    if len(rates) != len(optimizer.param_groups):
        raise ValueError(f"got {len(rates)} learning rates for {len(optimizer.param_groups)} "
                         "parameter groups; give one per group, or a single number")
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
