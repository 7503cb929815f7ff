"""Pallas attention kernels: tiled flash attention (forward + backward) and split-K decode.

`dispatch.attention` is what ops.attention(implementation="pallas") calls. Modules:
tiles (tile sizes and the tile plan), kernels (kernel bodies and their launch), flash
(grids, padding, custom_vjp), decode (split-K flash-decoding), dispatch (kernel/backend).
"""
from .decode import decode_attention
from .flash import flash_attention
from .tiles import BlockSizes, default_block_sizes, tile_bounds, tile_plan

__all__ = ["BlockSizes", "decode_attention", "default_block_sizes", "flash_attention",
           "tile_bounds", "tile_plan"]
