"""ImageNet normalization, applied on device to the uint8 views.

The pipelines ship uint8 images (a quarter of the bytes of float32) and the
train and eval steps normalize them: `(x / 255 - mean) / std`, exactly the
reference's `ToTensor` + `Normalize`. Padded pixels are 0 before
normalization, as in the reference.
"""

import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images, dtype=jnp.float32):
  """uint8 `(..., H, W, 3)` in [0, 255] -> normalized float `(..., H, W, 3)`."""
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
  return x.astype(dtype)
