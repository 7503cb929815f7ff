"""Pallas attention kernels: tiled flash attention (forward + backward) and split-K decode.

`dispatch.attention` is what ops.attention(implementation="pallas") calls.
"""
from .decode import decode_attention
from .flash import BlockSizes, default_block_sizes, flash_attention, tile_bounds, tile_plan

__all__ = ["BlockSizes", "decode_attention", "default_block_sizes", "flash_attention",
           "tile_bounds", "tile_plan"]
