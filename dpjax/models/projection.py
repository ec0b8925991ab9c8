"""An encoder with a SimCLR projection head, for contrastive pre-training."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class ProjectedEncoder(nn.Module):
  """images [b, H, W, C] -> (embeddings [b, embedding_dim], representations [b, r]).

  The backbone (any dpjax model; its "logits" of width r are the representation) is followed by
  the projection head Dense(hidden_dim) -> tanh -> Dense(embedding_dim). The contrastive loss
  sees the embeddings; linear probes and downstream tasks use the representations.
  """

  backbone: nn.Module
  hidden_dim: int = 128
  embedding_dim: int = 32

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    representations = self.backbone(images)
    hidden = jnp.tanh(nn.Dense(self.hidden_dim, name="projection_hidden")(representations))
    return nn.Dense(self.embedding_dim, name="projection_out")(hidden), representations
