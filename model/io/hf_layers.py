"""Which layers slide and which are MoE, between HF config.json keys and the Config.

Each family spells its per-layer pattern its own way, and jaxlm has one spelling
(Config.sliding_window + sliding_layers; first_k_dense, moe_every, mlp_only_layers):

  Qwen2, Qwen3, Qwen2-MoE   `layer_types` ("sliding_attention"/"full_attention" per layer),
                            derived when absent from use_sliding_window + max_window_layers
                            by a rule that differs between the families (see _default_types)
  Mistral, Mixtral, Qwen3-MoE   one sliding_window for every layer
  Qwen2-MoE, Qwen3-MoE      MoE iff i not in mlp_only_layers and (i+1) % decoder_sparse_step == 0
  DeepSeek-V3               MoE iff i >= first_k_dense_replace and i % moe_layer_freq == 0
"""
from __future__ import annotations

from typing import Any, Mapping

from ..config import Config

SLIDING, FULL = "sliding_attention", "full_attention"
PER_LAYER_WINDOWS = ("qwen2", "qwen3", "qwen2_moe")
ONE_WINDOW = ("mistral", "mixtral", "qwen3_moe")
QWEN_MOE = ("qwen2_moe", "qwen3_moe")
_DEFAULT_WINDOW = {"mistral": 4096, "mixtral": None}  # others: 4096, used only when enabled


# Sliding windows ---------------------------------------------------------------------------
def _default_types(hf: Mapping[str, Any], family: str, window: int | None) -> list[str]:
    """transformers 5.24's layer_types when config.json has none (the __post_init__ of
    Qwen2Config / Qwen3Config: layers >= max_window_layers slide; Qwen2MoeConfig: layers
    0, 2, 4, ... below max_window_layers slide)."""
    n, below = hf["num_hidden_layers"], hf.get("max_window_layers", 28)
    on = bool(hf.get("use_sliding_window", False))
    if family == "qwen2_moe":
        return [SLIDING if (i + 1) % 2 and i < below and on else FULL for i in range(n)]
    return [SLIDING if window is not None and i >= below else FULL for i in range(n)]


def windows_from_hf(hf: Mapping[str, Any], family: str) -> dict[str, Any]:
    """Config.sliding_window and sliding_layers of a config.json."""
    if family not in PER_LAYER_WINDOWS + ONE_WINDOW:
        return {}
    if family in ("mistral", "mixtral"):  # no switch: a window given is a window used
        return dict(sliding_window=hf.get("sliding_window", _DEFAULT_WINDOW[family]))
    on = bool(hf.get("use_sliding_window", False))
    window = hf.get("sliding_window", 4096) if on else None
    if family == "qwen3_moe":
        return dict(sliding_window=window)
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or _default_types(hf, family, window)
    if len(types) != n or set(types) - {SLIDING, FULL}:
        raise ValueError(f"{family}: layer_types must list num_hidden_layers={n} entries, each "
                         f"{SLIDING!r} or {FULL!r}; got {types}")
    sliding = tuple(i for i, t in enumerate(types) if t == SLIDING)
    if not sliding:
        return dict(sliding_window=None)
    if not window:  # transformers fails on these too, when it builds the sliding mask
        raise ValueError(f"{family}: layer_types makes layers {list(sliding)} sliding, but "
                         f"use_sliding_window={on} and sliding_window="
                         f"{hf.get('sliding_window')!r} give no window; set "
                         f"use_sliding_window=true and sliding_window to the window")
    return dict(sliding_window=window, sliding_layers=None if len(sliding) == n else sliding)


def _windows(cfg: Config) -> list[int | None]:
    return [cfg.layer_window(i) for i in range(cfg.n_layers)]


def _max_window_layers(types: list[str], family: str) -> int:
    """The max_window_layers whose default rule (_default_types) gives these types, when
    one does; else the nearest bound (transformers reads the explicit layer_types)."""
    sliding = [i for i, t in enumerate(types) if t == SLIDING]
    if family == "qwen2_moe":  # slides below it
        return sliding[-1] + 1 if sliding else 0
    return sliding[0] if sliding else len(types)


def windows_to_hf(cfg: Config, family: str) -> dict[str, Any]:
    """The config.json keys that give every layer cfg's window (for families that have one)."""
    windows = _windows(cfg)
    window = next((w for w in windows if w is not None), None)
    if family in ("mistral", "mixtral"):
        return dict(sliding_window=window)
    if family == "qwen3_moe":
        return dict(use_sliding_window=window is not None, sliding_window=window)
    if family not in PER_LAYER_WINDOWS:
        return {}
    types = [FULL if w is None else SLIDING for w in windows]
    return dict(use_sliding_window=window is not None, sliding_window=window,
                max_window_layers=_max_window_layers(types, family), layer_types=types)


def windows_wrong(cfg: Config, family: str) -> list[str]:
    """What `family` cannot represent about cfg's windows (empty when it can)."""
    windows = set(_windows(cfg))
    if windows == {None}:
        return []
    if family in ONE_WINDOW and len(windows) > 1:
        return [f"sliding_layers={cfg.sliding_layers}: {family} slides every layer or none "
                f"(qwen2, qwen3 and qwen2_moe take per-layer windows)"]
    if family not in PER_LAYER_WINDOWS + ONE_WINDOW:
        return [f"sliding_window must be None ({family} has no sliding attention)"]
    return []


# MoE layers -------------------------------------------------------------------------------
def moe_layers_from_hf(hf: Mapping[str, Any], family: str) -> dict[str, Any]:
    """Config.first_k_dense, moe_every and mlp_only_layers of an MoE config.json."""
    if family in QWEN_MOE:
        return dict(moe_every=hf.get("decoder_sparse_step", 1),
                    mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()))
    if family != "deepseek_v3":
        return {}
    n, k = hf["num_hidden_layers"], hf.get("first_k_dense_replace") or 0
    freq = hf.get("moe_layer_freq") or 1
    if not isinstance(freq, int) or freq < 1:
        raise ValueError(f"deepseek_v3: moe_layer_freq={freq!r} must be a positive int")
    # transformers 5 has no moe_layer_freq (every layer from first_k_dense_replace on is
    # MoE); DeepSeek's own modelling code applies it, and so does jaxlm.
    return dict(first_k_dense=k, moe_every=1,
                mlp_only_layers=tuple(i for i in range(k, n) if i % freq))


def _moe_set(cfg: Config) -> list[int]:
    return [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]


def deepseek_pattern(cfg: Config) -> tuple[int, int] | None:
    """(first_k_dense_replace, moe_layer_freq) giving cfg's MoE layers under DeepSeek's
    rule, keeping cfg.first_k_dense where it fits; None when no pair does."""
    moe, n = _moe_set(cfg), cfg.n_layers
    if not moe:
        return n, 1
    for k in (cfg.first_k_dense, moe[0]):
        for freq in range(1, n + 1):
            if [i for i in range(k, n) if i % freq == 0] == moe:
                return k, freq
    return None


def moe_layers_to_hf(cfg: Config, family: str) -> dict[str, Any]:
    if family in QWEN_MOE:  # Qwen has no first_k_dense: those layers are MLP-only too
        dense = set(cfg.mlp_only_layers) | set(range(min(cfg.first_k_dense, cfg.n_layers)))
        return dict(decoder_sparse_step=cfg.moe_every, mlp_only_layers=sorted(dense))
    if family == "deepseek_v3":
        k, freq = deepseek_pattern(cfg)
        return dict(first_k_dense_replace=k, moe_layer_freq=freq)
    return {}


def moe_layers_wrong(cfg: Config, family: str) -> list[str]:
    """What `family` cannot represent about which of cfg's layers are MoE."""
    if not cfg.n_experts:
        return []
    moe = _moe_set(cfg)
    if family == "mixtral" and len(moe) != cfg.n_layers:
        return [f"every layer must be MoE (Mixtral has no dense layers), but first_k_dense="
                f"{cfg.first_k_dense}, moe_every={cfg.moe_every}, mlp_only_layers="
                f"{list(cfg.mlp_only_layers)} leave layers "
                f"{sorted(set(range(cfg.n_layers)) - set(moe))} dense"]
    if family == "deepseek_v3" and deepseek_pattern(cfg) is None:
        return [f"MoE layers {moe} (from first_k_dense, moe_every, mlp_only_layers) do not "
                f"follow DeepSeek's rule: i >= first_k_dense_replace and "
                f"i % moe_layer_freq == 0"]
    return []
