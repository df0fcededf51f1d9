"""DyVTE's per-layer routers ("visual gates"), their input features, and their safetensors format.

Router of layer ``l`` (official ``DoubtedSteam/DyVTE``, ``llava/model/language_model/modeling_llama.py``)::

    g_l(x) = W2 · GELU(W1 · x),   W1: 2d → r,  W2: r → 2,  no biases
    x = [ mean(h_l[t] for text tokens after the image, excluding the last token) ; h_l[last token] ]

``h_l`` is the hidden state *after* layer ``l``; the router votes "exit" when ``logit[1] > logit[0]``. The paper uses
``r = 2048`` (839 M router parameters on LLaVA-1.5-13B); small models may use a smaller ``r`` (the testbed's 128-wide
``testbed-l`` uses 256) — the width is read from the file. We ship routers for layers ``0 … L-2`` only: an exit
after the last layer drops nothing (the official code declares one for every layer).

File format (safetensors): tensors ``routers.{l}.w1`` ``[r, 2d]`` and ``routers.{l}.w2`` ``[2, r]``; metadata
``format = vlm_accel.dyvte.routers``, ``hidden_size``, ``num_layers``, ``router_hidden``, ``model_type`` and
``fingerprint`` (:func:`model_fingerprint`), so routers trained for another model are refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vlm_accel.runtime.devices import onloaded

FORMAT = "vlm_accel.dyvte.routers"


class DyVTERouters(nn.Module):
    """One two-layer MLP router per decoder layer ``0 … num_routers-1`` (stacked weights)."""

    def __init__(self, hidden_size: int, num_routers: int, router_hidden: int) -> None:
        super().__init__()
        for name, value in (
            ("hidden_size", hidden_size),
            ("num_routers", num_routers),
            ("router_hidden", router_hidden),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.hidden_size = hidden_size
        self.router_hidden = router_hidden
        self.w1 = nn.Parameter(torch.empty(num_routers, router_hidden, 2 * hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_routers, 2, router_hidden))
        self.reset_parameters()

    @property
    def num_routers(self) -> int:
        return self.w1.shape[0]

    def reset_parameters(self) -> None:
        """Xavier-uniform, as the official ``init_weight.py``."""
        for weights in (self.w1, self.w2):
            for w in weights.data:
                nn.init.xavier_uniform_(w)

    def forward(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 2]`` of router ``layer`` for features ``[B, 2d]`` (fp32)."""
        x = features.to(self.w1.dtype)
        return F.linear(F.gelu(F.linear(x, self.w1[layer])), self.w2[layer])

    def all_layers(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, R, 2]`` of every router ``l`` on its own features ``features[:, l]`` ``[B, R, 2d]``."""
        hidden = F.gelu(torch.einsum("brd,rhd->brh", features.to(self.w1.dtype), self.w1))
        return torch.einsum("brh,rch->brc", hidden, self.w2)

    # ------------------------------------------------------------------------------------------ files

    def save(self, path: str | Path, metadata: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for layer in range(self.num_routers):
            tensors[f"routers.{layer}.w1"] = self.w1[layer].detach().float().contiguous()
            tensors[f"routers.{layer}.w2"] = self.w2[layer].detach().float().contiguous()
        meta = {"format": FORMAT, "hidden_size": str(self.hidden_size), "router_hidden": str(self.router_hidden),
                **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}  # fmt: skip
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> tuple[DyVTERouters, dict[str, str]]:
        """Routers and the file's metadata; ``ValueError`` for a file that is not a consistent router file."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"dyvte: no router file at {path}; train one with `vlm-accel train dyvte`"
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except Exception as exc:  # SafetensorError (corrupt, empty, a pickle), OSError: name the file and method
            raise ValueError(
                f"dyvte: cannot read router file {path} as safetensors ({type(exc).__name__}: {exc}); "
                "train one with `vlm-accel train dyvte`"
            ) from exc
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"dyvte: {path} is not a DyVTE router file (metadata format {meta.get('format')!r})"
            )
        count = len([k for k in tensors if k.endswith(".w1")])
        expected = {f"routers.{i}.{w}" for i in range(count) for w in ("w1", "w2")}
        if set(tensors) != expected or count == 0:
            raise ValueError(
                f"dyvte: {path} holds tensors {sorted(tensors)}; expected routers.0..{count - 1}.w1/w2"
            )
        w1 = torch.stack([tensors[f"routers.{i}.w1"] for i in range(count)])
        w2 = torch.stack([tensors[f"routers.{i}.w2"] for i in range(count)])
        if w1.dim() != 3 or w1.shape[2] % 2 or w2.shape != (count, 2, w1.shape[1]):
            raise ValueError(
                f"dyvte: router shapes in {path} are inconsistent: w1 {tuple(w1.shape[1:])}, w2 {tuple(w2.shape[1:])}; "
                "expected w1 [r, 2d] and w2 [2, r]"
            )
        routers = cls(w1.shape[2] // 2, count, w1.shape[1])
        routers.w1.data.copy_(w1)
        routers.w2.data.copy_(w2)
        return routers.eval(), meta


def model_fingerprint(model: nn.Module) -> str:
    """A short hash identifying a language model's weights (dtype-independent: values rounded to bf16).

    Hashes the model type, hidden size, layer count, vocabulary size, the first rows of the input embedding and the
    final norm's weight — enough to tell two trainings of the same architecture apart, cheap to compute.
    """
    from vlm_accel.patches import adapter_for

    adapter = adapter_for(model)
    text = adapter.text_config(model)
    digest = hashlib.sha256()
    digest.update(
        f"{model.config.model_type}|{text.hidden_size}|{text.num_hidden_layers}|{text.vocab_size}".encode()
    )
    for module, rows in ((adapter.language_model(model).get_input_embeddings(), 64), (adapter.final_norm(model), None)):
        with onloaded(module):  # an offloaded (accelerate) module's weight is on the meta device outside this
            tensor = module.weight[:rows]
            digest.update(tensor.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def model_metadata(model: nn.Module) -> dict[str, str]:
    """What a router file records about the model it was trained for."""
    from vlm_accel.patches import adapter_for

    text = adapter_for(model).text_config(model)
    return {"model_type": model.config.model_type, "num_layers": str(text.num_hidden_layers),
            "model_hidden_size": str(text.hidden_size), "fingerprint": model_fingerprint(model),
            "model_name": str(getattr(model.config, "_name_or_path", ""))}  # fmt: skip


def check_routers(
    routers: DyVTERouters, meta: dict[str, str], model: nn.Module, check_fingerprint: bool
) -> None:
    """``ValueError`` unless ``routers`` fit ``model`` (shapes) and were trained for it (fingerprint)."""
    from vlm_accel.patches import adapter_for

    text = adapter_for(model).text_config(model)
    hidden, layers = int(text.hidden_size), int(text.num_hidden_layers)
    if routers.hidden_size != hidden:
        raise ValueError(
            f"dyvte: routers take 2×{routers.hidden_size} inputs but this model's hidden size is {hidden} "
            "(router input = [mean text state ; last token state] = 2d)"
        )
    if routers.num_routers != layers - 1:
        raise ValueError(
            f"dyvte: the file holds {routers.num_routers} routers but this {layers}-layer model needs {layers - 1} "
            "(one after each layer except the last)"
        )
    if check_fingerprint:
        mine = model_fingerprint(model)
        theirs = meta.get("fingerprint")
        if theirs != mine:
            raise ValueError(
                f"dyvte: these routers were trained for another model ({meta.get('model_name') or 'unnamed'}, "
                f"fingerprint {theirs}) than this one (fingerprint {mine}); routers are specific to the weights they "
                "were trained on — retrain with `vlm-accel train dyvte`, or pass check_fingerprint=False"
            )


def text_span_mask(visual: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, W]``: the text tokens after each row's last visual token, excluding the prompt's last token.

    Left padding lies before the image, so it is never included; rows without visual tokens get an empty span.
    """
    batch, window = visual.shape
    positions = torch.arange(window, device=visual.device).expand(batch, window)
    last_visual = torch.where(visual, positions, -1).amax(dim=1, keepdim=True)
    span = (positions > last_visual) & (positions < window - 1) & present & ~visual
    return span & (last_visual >= 0)


def router_features(hidden: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """``[B, 2d]`` fp32: ``[mean of hidden over span ; hidden of the last slot]`` (the router input).

    Rows with an empty span get a NaN mean, as in the official code (its comparison is then False: no exit).
    """
    weights = span.to(torch.float32)[..., None]
    count = weights.sum(dim=1)
    mean = (hidden.float() * weights).sum(dim=1) / count  # 0/0 = NaN for an empty span
    return torch.cat([mean, hidden[:, -1].float()], dim=-1)
