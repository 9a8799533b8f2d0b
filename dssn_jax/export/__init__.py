"""Take a trained model anywhere: the authors' PyTorch layouts, or a
serialized inference program that needs no dssn_jax model code.

    python -m dssn_jax.export --workdir DIR --to torch --out model.pth
    python -m dssn_jax.export --workdir DIR --to stablehlo --out model.shlo

    from dssn_jax import export
    masks = export.load('model.shlo')(images)   # uint8 (B, H, W, 3) -> int32 (B, H, W)

`torch_state` writes the state dicts (the inverse of `dssn_jax.convert`),
`stablehlo` the program, `program` holds the file format and its loader;
importing this package imports only the loader (jax, numpy), never
`dssn_jax.models`. docs/export.md has the commands and the layouts.
"""

from dssn_jax.export.program import Segmenter, load

__all__ = ['Segmenter', 'load']
