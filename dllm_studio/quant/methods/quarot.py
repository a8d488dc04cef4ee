"""QuaRot (Ashkboos et al., arXiv:2404.00456): rotate the model so no activation channel stands out, then round.

All in full precision first, and exactly (the rotated model's logits equal the original's, `rotate`):
1. every RMSNorm's gain is fused into the linears reading it (the final norm's into the head), leaving
   gains of 1, so each norm commutes with an orthogonal Q: norm(xQ) = norm(x)Q;
2. the residual stream is rotated by a randomized Hadamard Q (seeded by the recipe): the embedding writes
   E·Q, readers (q, k, v, gate, up, head) take W·Q, writers (o, down) write Qᵀ·W;
3. the value/output pair is rotated head-wise (each head's values by a Hadamard of the head size, undone in
   the output projection's columns), offline;
4. the down projection's input gets an online Hadamard (`InputTransform`; the weight takes it too).
Then GPTQ rounds the rotated weights, per output channel and symmetric, with per-token activations, as the
seed study ran it. Attention itself (queries, keys, values, softmax) stays in full precision.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dllm_studio.errors import QuantizationError
from dllm_studio.events import CancelToken
from dllm_studio.quant import rotation
from dllm_studio.quant.capture import transform_linear
from dllm_studio.quant.methods.gptq import GPTQ
from dllm_studio.quant.transforms import InputTransform

READERS = ("q", "k", "v", "qkv", "gate", "up", "gate_up")
WRITERS = ("o", "down")
NORM_STAGES = ("q", "gate")  # the stages whose producer is a norm (its gain is fused into the readers)
OUTSIDE_ROWS = 4096  # embedding and head rows rotated between cancel checks (an 8B's vocabulary is 126464)


class QuaRot(GPTQ):
    def __init__(self, model, recipe, cancel=None):
        super().__init__(model, recipe, cancel)
        check_rotatable(model)
        generator = torch.Generator().manual_seed(recipe.seed)
        self.Q = rotation.random_hadamard(model.hidden_size, generator).to(model.device)

    @classmethod
    def working_bytes(cls, model, layers):
        # The rotated embedding and head are new tensors (the original model stays as it was), rotated at fp32.
        rows = sum(l.out_features for l in model.linear_layers() if l.role == "head") + model.vocab_size
        return {"rotated embedding and head": rows * model.hidden_size * (model.dtype.itemsize + 4)}

    def hidden_states(self, x):
        return (x.float() @ self.Q).to(x.dtype)

    def plain_states(self, x):
        return (x.float() @ self.Q.T).to(x.dtype)

    def prepare_block(self, block, taps):
        rotate_block(self.model, block.module, block.linears, self.Q, self.cancel)
        self.roles = {name: layer.role for name, layer in block.linears.items()}

    def transform_label(self, name):
        role = self.roles[name]
        if role == "down":
            return "online Hadamard", "the MLP's hidden activations, rotated as the layer runs"
        if role == "o":
            return "head-wise Hadamard", "each attention head's values, rotated offline"
        return "randomized Hadamard", "the residual stream, rotated offline"

    def outside(self):
        return rotate_outside(self.model, self.Q, self.cancel)


def check_rotatable(model) -> None:
    if model.embedding_name is None or model.final_norm_name is None:
        raise QuantizationError(f"QuaRot rotates the residual stream from the embedding to the final norm; dLLM Studio "
                                f"knows where they are in LLaDA and Dream, not in {model.family}.")
    if not any(l.role == "head" for l in model.linear_layers()):
        raise QuantizationError(f"{model.source} ties its LM head to the embedding; QuaRot needs the head apart to "
                                "fuse the final norm into it.")


def _fuse_gain(norm: nn.Module, readers: list[nn.Module]) -> None:
    """Fold the norm's gain into the readers' input columns and set it to 1 (exact)."""
    gain = norm.weight.detach().float()
    for linear in readers:
        linear.weight.data = (linear.weight.float() * gain).to(linear.weight.dtype)
    norm.weight.data.fill_(1.0)


def _right(linear: nn.Module, Q: torch.Tensor) -> None:  # a reader: W <- W Q
    linear.weight.data = (linear.weight.float() @ Q).to(linear.weight.dtype)


def _left(linear: nn.Module, Q: torch.Tensor) -> None:  # a writer: W <- Qᵀ W (its output, and bias, rotated)
    linear.weight.data = (Q.T @ linear.weight.float()).to(linear.weight.dtype)
    if linear.bias is not None:
        linear.bias.data = (linear.bias.float() @ Q).to(linear.bias.dtype)


def rotate_block(model, block: nn.Module, linears: dict, Q: torch.Tensor, cancel: CancelToken | None = None) -> None:
    """Steps 1-4 on one block (in place); `linears`: local name -> LinearLayer, every linear of the block. `cancel` is
    checked before each linear's rotation (an 8B's MLP weight times Q takes seconds); a cancelled block copy is
    dropped half rotated."""
    by_role = {}
    for name, layer in linears.items():
        by_role.setdefault(layer.role, []).append(name)
    for first in NORM_STAGES:
        norm = block.get_submodule(model.scale_producers[first])
        stage = READERS[:4] if first == "q" else READERS[4:]
        _fuse_gain(norm, [block.get_submodule(n) for r in stage for n in by_role.get(r, ())])
    for name, layer in linears.items():
        if cancel is not None:
            cancel.check()
        (_right if layer.role in READERS else _left)(block.get_submodule(name), Q)
    head_dim = getattr(model.module.config, "head_dim", None)
    if head_dim and by_role.get("v") and by_role.get("o"):
        H = rotation.hadamard_matrix(head_dim).to(Q.device)
        for name in by_role["v"]:  # each head's value rows: W_h <- Hᵀ W_h
            v = block.get_submodule(name)
            rows = v.weight.float().view(-1, head_dim, v.in_features)
            v.weight.data = torch.einsum("ji,hjc->hic", H, rows).reshape(v.weight.shape).to(v.weight.dtype)
            if v.bias is not None:
                v.bias.data = (v.bias.float().view(-1, head_dim) @ H).reshape(-1).to(v.bias.dtype)
        for name in by_role["o"]:  # ... undone in each head's output columns: W[:, h] <- W[:, h] H
            o = block.get_submodule(name)
            cols = o.weight.float().view(o.out_features, -1, head_dim)
            o.weight.data = (cols @ H).reshape(o.weight.shape).to(o.weight.dtype)
    for name in by_role.get("down", ()):
        width = block.get_submodule(name).in_features
        transform_linear(block, name, InputTransform(width, hadamard=rotation.hadamard_factor(width)))


def _right_rows(weight: torch.Tensor, Q: torch.Tensor, cancel: CancelToken | None) -> None:
    """weight <- weight Q in place, OUTSIDE_ROWS rows at a time with a cancel check before each."""
    for rows in weight.data.split(OUTSIDE_ROWS):
        if cancel is not None:
            cancel.check()
        rows.copy_(rows.float() @ Q)


def rotate_outside(model, Q: torch.Tensor, cancel: CancelToken | None = None) -> dict[str, nn.Module]:
    """The rotated embedding, the final norm with gain 1, and the head with that gain fused and Q applied (copies:
    the model's own stay as they were)."""
    embedding = copy.deepcopy(model.module.get_submodule(model.embedding_name))
    _right_rows(embedding.weight, Q, cancel)
    norm = copy.deepcopy(model.module.get_submodule(model.final_norm_name))
    replaced = {model.embedding_name: embedding, model.final_norm_name: norm}
    heads = [copy.deepcopy(model.module.get_submodule(l.name)) for l in model.linear_layers() if l.role == "head"]
    _fuse_gain(norm, heads)
    for layer, head in zip([l for l in model.linear_layers() if l.role == "head"], heads):
        _right_rows(head.weight, Q, cancel)
        replaced[layer.name] = head
    return replaced


def rotate(model, recipe):
    """The whole model rotated in full precision (steps 1-4, no rounding): a copy whose logits equal the
    original's up to float error. What `QuaRot` does block by block, in one piece, to check it."""
    method = QuaRot(model, recipe)
    rotated = copy.deepcopy(model)
    module = rotated.module
    prefix = {id(b): n for n, b in module.named_modules()}
    for block in rotated.blocks():
        name = prefix[id(block)] + "."
        linears = {l.name[len(name):]: l for l in rotated.linear_layers() if l.name.startswith(name)}
        rotate_block(rotated, block, linears, method.Q)
    for name, replacement in rotate_outside(model, method.Q).items():
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, replacement)
    return rotated


METHOD = QuaRot
