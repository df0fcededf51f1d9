"""What a patch did: tokens per layer, KV-cache lengths and bytes, visual tokens kept, time spent in the patch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class PatchStats:
    """Running statistics of one patch (``Patch.stats``).

    ``tokens_per_layer`` is the sequence width each decoder layer processed in the last prefill (padded width
    for a batch); ``kv_length_per_layer`` / ``kv_bytes_per_layer`` describe the cache after the last forward, and
    ``kv_bytes_unpatched`` what the same cache holds when every layer keeps every token.
    """

    forward_calls: int = 0
    prefill_calls: int = 0
    decode_calls: int = 0
    visual_tokens_seen: int = 0
    visual_tokens_kept: int = 0
    tokens_per_layer: list[int] = field(default_factory=list)
    kv_length_per_layer: list[int] = field(default_factory=list)
    kv_bytes_per_layer: list[int] = field(default_factory=list)
    kv_bytes_unpatched: int = 0
    time_in_patch_s: float = 0.0
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def visual_keep_fraction(self) -> float:
        return self.visual_tokens_kept / self.visual_tokens_seen if self.visual_tokens_seen else 1.0

    @property
    def kv_bytes(self) -> int:
        return sum(self.kv_bytes_per_layer)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["visual_keep_fraction"] = self.visual_keep_fraction
        data["kv_bytes"] = self.kv_bytes
        return data
