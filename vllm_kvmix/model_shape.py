"""The attention shape of a model (layers, KV heads, head size) from its ``config.json``."""

from __future__ import annotations

import json
from pathlib import Path


def model_shape(model_dir: str | None) -> dict:
    """Attention shape of a model directory (config.json); Llama-3.1-8B's by default."""
    if model_dir is None:
        return {"name": "Llama-3.1-8B", "num_layers": 32, "num_kv_heads": 8, "head_size": 128}
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    heads = cfg["num_attention_heads"]
    return {
        "name": Path(model_dir).name,
        "num_layers": cfg["num_hidden_layers"],
        "num_kv_heads": cfg.get("num_key_value_heads", heads),
        "head_size": cfg.get("head_dim") or cfg["hidden_size"] // heads,
    }
