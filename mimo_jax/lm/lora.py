"""LoRA adapters on the LM's linear layers, chosen by regular expressions over their official
PyTorch module names (`model.layers.3.self_attn.q_proj`), and their merge into the base weights.

An adapted layer is a `LoRADense`: it keeps the wrapped Dense's parameters where they were
(`.../q_proj/kernel`, `.../q_proj/bias`, so base weights keep their paths and conversion rules) and
holds a Flax `nnx.LoRA` (`.../q_proj/lora/lora_a` [in, r], `lora_b` [r, out], `nnx.LoRAParam`s,
which the trainer tells apart from base parameters); in a stacked transformer both carry the leading
`layers` axis. It computes PEFT's `base(x) + lora_B(lora_A(dropout(x))) * alpha / r`: PEFT's
`lora_A.weight` is `lora_a.T`, its `lora_B.weight` is `lora_b.T`.

QLoRA: `quantize_base` holds the frozen kernels of the untrained groups' linear layers quantised
(`mimo_jax.nn.quantized`): an adapted layer keeps `.../q_proj/kernel_values` and `kernel_scales` in
place of `kernel`, a plain one becomes a `QuantizedDense`; each is dequantised at each use, and the
adapters and the compute keep their dtypes. `merge_lora` adds the adapters into the dequantised
kernels (the weights they were trained against) and dequantises the rest.

Why `nnx.LoRA` and not qwix's LoraProvider (qwix 0.1.8): qwix intercepts `dot_general` during a
first call of the model and creates the adapters on the module it finds on the Python stack, after
setting per-module attributes (an `nnx.Rngs` among them) on every module. Our stacks run their
layers under `jax.lax.scan` over the split state of one stacked module (`nn.stack`): applied to
MiMoAudioLM, `qwix.apply_lora_to_model` fails inside `scan_layers` (the Rngs it attached to the
stacked layers have no `layers` axis to scan over), and adapters it created on the per-step copies
would not outlive the step. `nnx.LoRA` is built stacked like the layer it adapts.
"""

import dataclasses
import math
import re
from typing import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from mimo_jax.lm.conversion import LMFamily
from mimo_jax.lm.groups import group_of
from mimo_jax.nn import quantized
from mimo_jax.nn.layers import Dense
from mimo_jax.nn.params import logical_axes
from mimo_jax.nn.quantized import Quantization, QuantizedDense, QuantizedKernel
from mimo_jax.nn.stack import stacked

# What a module group does in a LoRA run: adapters on its targeted layers (base frozen), every
# parameter trained, or nothing trained.
MODES = ("lora", "full", "frozen")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]  # regular expressions, each fully matching official module names

    def __post_init__(self):
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"lora.rank={self.rank!r}: expected an integer >= 1")
        if not (
            isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0
        ):
            raise ValueError(f"lora.alpha={self.alpha!r}: expected a finite number > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout!r}: expected a number in [0, 1)")
        if not self.targets:
            raise ValueError("lora.targets=(): expected one or more module name patterns")
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(
                    f"lora.targets pattern {pattern!r}: not a regular expression ({e})"
                ) from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRADense(Dense):
    """A Dense with an `nnx.LoRA` beside it: y = dense(x) + scale * dropout(x) @ lora_a @ lora_b.

    Dropout (PEFT's `lora_dropout`, on the adapter's input only) runs when a key is given, which the
    transformer block does in training (`nn.transformer._project`). The base kernel is either the
    wrapped Dense's `kernel` or, after `quantize_base`, its quantised values and scales."""

    takes_dropout_rng = True

    def __init__(self, base: Dense, lora: nnx.LoRA, *, rank: int, alpha: float, dropout: float):
        self.kernel, self.bias, self.dtype = base.kernel, base.bias, base.dtype
        self.lora = lora
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.quantized: str | None = None  # the qtype of a quantised base
        # Data attributes (nnx.data) though empty until `quantize_base` fills them.
        self.kernel_values: QuantizedKernel | None = nnx.data(None)
        self.kernel_scales: QuantizedKernel | None = nnx.data(None)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def quantize_base(self, q: Quantization) -> None:
        """Holds the base kernel quantised from now on (in place; the float kernel is dropped)."""
        assert self.quantized is None, "the base kernel is quantised already"
        self.kernel_values, self.kernel_scales = quantized.quantized_kernel(self.kernel, q)
        del self.kernel
        self.quantized = q.qtype

    def base_kernel(self) -> jax.Array:
        """The frozen kernel [..., in, out] (dequantised when held quantised)."""
        if self.quantized is None:
            return self.kernel[...]
        assert self.kernel_values is not None and self.kernel_scales is not None
        return quantized.dequantize(
            self.kernel_values[...], self.kernel_scales[...], self.quantized
        )

    def held_kernel(self) -> nnx.Variable:
        """The variable the base kernel is held in (its values, when quantised)."""
        held = self.kernel if self.quantized is None else self.kernel_values
        assert held is not None
        return held

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return tuple(self.held_kernel().shape)

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        dtype = self.dtype if self.dtype is not None else x.dtype
        y = jnp.dot(x.astype(dtype), self.base_kernel().astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        if dropout_rng is not None and self.dropout > 0:
            keep = jax.random.bernoulli(dropout_rng, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        return y + (self.lora(x) * self.scale).astype(y.dtype)


@dataclasses.dataclass(frozen=True)
class LinearLayer:
    """A Dense of the model: its NNX path, official module name (`{i}`: the layer index of a
    stacked one), layer count (None: not stacked), [in, out] width, and whether it has an
    adapter."""

    path: tuple[str, ...]
    name: str
    layers: int | None
    features: tuple[int, int]
    adapted: bool = False

    def names(self) -> list[str]:
        return [self.name.format(i=i) for i in range(self.layers)] if self.layers else [self.name]

    def shown(self) -> str:
        return f"{self.name} (i = 0..{self.layers - 1})" if self.layers else self.name


def linear_layers(model: nnx.Module) -> list[LinearLayer]:
    """Every Dense (adapted or not) of the LM with its official module name."""
    family, out = LMFamily(), []
    for path, module in nnx.iter_modules(model):
        if isinstance(module, (Dense, QuantizedDense)):
            names = tuple(str(p) for p in path)
            rule = family.rule(names + ("kernel",))
            shape = (
                module.kernel_shape
                if isinstance(module, (LoRADense, QuantizedDense))
                else module.kernel.shape
            )
            out.append(
                LinearLayer(
                    names,
                    rule.torch_name.removesuffix(".weight"),
                    shape[0] if rule.stacked else None,
                    (shape[-2], shape[-1]),
                    isinstance(module, LoRADense),
                )
            )
    return sorted(out, key=lambda layer: layer.path)


def select(
    layers: list[LinearLayer], cfg: LoraConfig, lora_groups: Iterable[str] | None = None
) -> tuple[list[LinearLayer], list[str]]:
    """The layers the targets choose, and the problems of the choice (one line each): a pattern
    that matches no layer (naming the layers that exist), a pattern that matches part of a stack,
    a rank wider than a layer, a layer adapted already, a chosen layer outside `lora_groups` (None:
    any group), a LoRA group none of whose layers is chosen."""
    problems: list[str] = []
    chosen: list[LinearLayer] = []
    existing = "; ".join(layer.shown() for layer in layers)
    for pattern in cfg.targets:
        if not any(re.fullmatch(pattern, n) for layer in layers for n in layer.names()):
            problems.append(
                f"lora.targets pattern '{pattern}' matches no linear layer; the "
                f"model's linear layers are: {existing}"
            )
    for layer in layers:
        hits = [
            i for i, n in enumerate(layer.names()) if any(re.fullmatch(p, n) for p in cfg.targets)
        ]
        if not hits:
            continue
        if len(hits) < len(layer.names()):
            problems.append(
                f"lora.targets match layers {hits} of {layer.shown()}, not all "
                f"{layer.layers}: a stacked layer takes adapters on every layer or "
                f"none"
            )
        if layer.adapted:
            problems.append(f"layer {layer.name} already has a LoRA adapter")
        if cfg.rank > min(layer.features):
            problems.append(
                f"lora.rank={cfg.rank}: wider than layer {layer.name} "
                f"[in {layer.features[0]}, out {layer.features[1]}]; expected a rank "
                f"<= {min(layer.features)}"
            )
        if cfg.dropout > 0 and not layer.layers:
            problems.append(
                f"lora.dropout={cfg.dropout}: layer {layer.name} is outside the "
                f"transformer stacks, whose adapters run without dropout; expected "
                f"lora.dropout=0 or targets inside the stacks"
            )
        group = group_of(layer.path)
        if lora_groups is not None and group not in lora_groups:
            problems.append(
                f"lora.targets match {layer.shown()} of module group {group!r}, "
                f"which is not in LoRA mode (lora.modes.{group})"
            )
        chosen.append(layer)
    for group in lora_groups or ():
        if not any(group_of(layer.path) == group for layer in chosen):
            problems.append(f"lora.modes.{group}='lora': lora.targets match none of its layers")
    return chosen, problems


def module_at(model: nnx.Module, path: tuple[str, ...]):
    node = model
    for part in path:
        node = node[int(part)] if isinstance(node, nnx.List) else getattr(node, part)
    return node


def _set_module(model: nnx.Module, path: tuple[str, ...], module: nnx.Module) -> None:
    parent = module_at(model, path[:-1])
    if isinstance(parent, nnx.List):
        parent[int(path[-1])] = module
    else:
        setattr(parent, path[-1], module)


def _adapter(dense: Dense, layer: LinearLayer, rank: int, rngs: nnx.Rngs) -> nnx.LoRA:
    """An nnx.LoRA for the Dense (stacked like it), its axes those of the kernel's in and out."""
    *_, ax_in, ax_out = logical_axes(dense.kernel)
    meta = lambda axes: {"out_sharding": axes, "eager_sharding": False}

    def make(r: nnx.Rngs) -> nnx.LoRA:
        return nnx.LoRA(
            layer.features[0],
            rank,
            layer.features[1],
            dtype=dense.dtype,
            param_dtype=dense.kernel.dtype,
            rngs=r,
            a_metadata=meta((ax_in, None)),
            b_metadata=meta((None, ax_out)),
        )

    return stacked(make, layer.layers, rngs) if layer.layers else make(rngs)


def apply_lora(
    model: nnx.Module, cfg: LoraConfig, *, rngs: nnx.Rngs, lora_groups: Iterable[str] | None = None
) -> list[LinearLayer]:
    """Wraps the layers the targets choose in LoRADense (in place; lora_b starts at zero, so the
    model computes what it did). Returns those layers; raises one error naming every problem."""
    lora_groups = tuple(lora_groups) if lora_groups is not None else None
    chosen, problems = select(linear_layers(model), cfg, lora_groups)
    if problems:
        raise ValueError("LoRA adapters:\n  " + "\n  ".join(problems))
    for layer in chosen:
        dense = module_at(model, layer.path)
        lora = _adapter(dense, layer, cfg.rank, rngs)
        _set_module(
            model,
            layer.path,
            LoRADense(dense, lora, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout),
        )
    return chosen


def adapted(model: nnx.Module) -> list[tuple[LinearLayer, LoRADense]]:
    return [
        (layer, m)
        for layer in linear_layers(model)
        if isinstance(m := module_at(model, layer.path), LoRADense)
    ]


def merged_kernel(module: LoRADense) -> jax.Array:
    """base kernel + scale * lora_a @ lora_b, summed in float32 (per layer when stacked), in the
    base kernel's dtype."""
    f32 = lambda v: v.astype(jnp.float32)
    delta = jnp.matmul(f32(module.lora.lora_a[...]), f32(module.lora.lora_b[...])) * module.scale
    base = module.base_kernel()
    return (f32(base) + delta).astype(base.dtype)


def quantize_base(model: nnx.Module, q: Quantization, groups: Iterable[str]) -> list[LinearLayer]:
    """Holds the frozen kernel of every linear layer of these module groups quantised (in place):
    an adapted layer keeps its adapters, a plain one becomes a QuantizedDense. Returns the layers.
    A tile that does not divide a layer's inputs is named with the layer, and nothing changes."""
    layers = [layer for layer in linear_layers(model) if group_of(layer.path) in set(groups)]
    bad = [layer.shown() for layer in layers if layer.features[0] % q.tile]
    if bad:
        raise ValueError(
            f"lora.quantize_tile={q.tile}: does not divide the inputs of {'; '.join(bad)}; "
            f"expected a divisor of every quantised layer's input width "
            f"{sorted({layer.features[0] for layer in layers})}"
        )
    for layer in layers:
        module = module_at(model, layer.path)
        if isinstance(module, LoRADense):
            module.quantize_base(q)
        else:
            _set_module(model, layer.path, QuantizedDense(module, q))
    return layers


def _plain(module: LoRADense | QuantizedDense, kernel: jax.Array, meta: dict) -> Dense:
    """A Dense of this kernel and the module's bias and dtype."""
    in_f, out_f = module.kernel_shape[-2:]
    plain = nnx.eval_shape(
        lambda: Dense(
            in_f,
            out_f,
            axes=(None, None),
            use_bias=module.bias is not None,
            dtype=module.dtype,
            rngs=nnx.Rngs(0),
        )
    )
    plain.kernel, plain.bias = nnx.Param(kernel, **meta), module.bias
    return plain


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A copy of the model with every adapter added into its base kernel and removed, and every
    quantised kernel dequantised: the plain architecture again, which a model checkpoint and the
    converter take. `model` is unchanged."""
    model = nnx.clone(model)  # new Variables: setting theirs leaves `model`'s alone
    for path, module in list(nnx.iter_modules(model)):
        if isinstance(module, LoRADense):
            plain = _plain(module, merged_kernel(module), module.held_kernel().get_metadata())
        elif isinstance(module, QuantizedDense):
            plain = _plain(module, module.kernel(), module.kernel_values.get_metadata())
        else:
            continue
        _set_module(model, tuple(str(p) for p in path), plain)
    return model
