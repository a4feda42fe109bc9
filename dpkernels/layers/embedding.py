"""nn.Embedding: a sample's gradient touches only the rows of its ids (repeated ids summed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpkernels import ops
from dpkernels.layers import cancellation
from dpkernels.layers.base import DPLayer, Record, register_layer


@register_layer(nn.Embedding)
class DPEmbedding(DPLayer):
    """nn.Embedding: a sample's gradient touches only the rows of its ids (repeated ids summed)."""
    param_names = ("weight",)

    def check_module(self) -> None:
        """Refuse max_norm, sparse=True and scale_grad_by_freq=True."""
        m = self.module
        if m.max_norm is not None or m.sparse:
            raise ValueError(f"{self.name}: Embedding with max_norm or sparse=True is not supported")
        if m.scale_grad_by_freq:
            raise ValueError(f"{self.name}: Embedding with scale_grad_by_freq=True is not supported")

    def compute(self, ids, params):
        """The lookup; saves the ids.

        Args and Returns: as `DPLayer.compute`.
        """
        m = self.module
        return F.embedding(ids, params[0], m.padding_idx), {"ids": ids}

    def input_grad(self, saved: dict, grad_out: torch.Tensor) -> torch.Tensor:
        """Ids have no gradient: never called with one wanted.

        Args and Returns: as `DPLayer.input_grad`.
        """
        raise RuntimeError("an embedding's input has no gradient")

    def tokens(self, rec: Record, grouping) -> tuple[torch.Tensor, torch.Tensor]:
        """The example tokens: ids [n, k*T] and G [n, k*T, D], G zeroed at padding_idx (that row gets no gradient).

        Args:
            rec: the call's record.
            grouping: which rows form one example.

        Returns:
            (ids, G).
        """
        ids, G = rec.saved["ids"], rec.grad_out
        B, T, D = G.shape[0], ids.shape[1:].numel(), G.shape[-1]
        G = G.reshape(B, T, D)
        if self.module.padding_idx is not None:
            # the padding row gets no gradient (as in F.embedding's backward)
            G = G.masked_fill((ids.reshape(B, T) == self.module.padding_idx).unsqueeze(-1), 0)
        ids3 = grouping.tokens(ids.reshape(B, T, 1)).squeeze(-1)
        return ids3, grouping.tokens(G)

    def sq_norms(self, rec, grouping, backend):
        """`ops.embedding_norm` over the example tokens.

        Args and Returns: as `DPLayer.sq_norms`.
        """
        ids, G = self.tokens(rec, grouping)
        sq = ops.embedding_norm(ids, G, backend=backend)
        if G.shape[1] > 1:  # rows of repeated ids can cancel: see dpkernels/layers/cancellation.py
            sq = cancellation.guard(sq, cancellation.token_norms(G).sum(1), G.dtype)
        return {"weight": sq}

    def clipped_sums(self, rec, grouping, c, noise_std, noise, backend):
        """`ops.embedding_clipped_sum`: noise on the whole table.

        Args and Returns: as `DPLayer.clipped_sums`.
        """
        ids, G = self.tokens(rec, grouping)
        w = self.module.weight
        seed, offset = noise.take(w.numel())
        return {"weight": ops.embedding_clipped_sum(ids, G, c["weight"], w.shape[0], noise_std, seed, offset,
                                                    backend=backend)}
