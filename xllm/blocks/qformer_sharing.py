"""Work that the Q-Former passes of one stage-0 step share, done once: `SharedPasses`.

BLIP-2's stage-1 step runs the Q-Former several times over the same pictures: the queries alone (ITC), three rows a
picture for ITM (its caption, a hard-negative caption, and its caption beside a hard-negative picture), the queries
and caption again for ITG. LAVIS's step (`Blip2Qformer.forward`) projects each picture's 257 feature tokens to the
keys and values of every cross-attention layer four times, with the backward matmuls of each: at BLIP-2's shape
(EVA-ViT-g's 1408-wide tokens, 6 cross-attention layers) that is ~6.7 GFLOP a picture per pass, as much as the
queries' own layers. Within `with SharedPasses(qformer, features) as shared:`

- each cross-attention layer projects the step's features once; a pass over some of the pictures (`shared.rows(i)`:
  the ITM rows, the flipped answers, the QA-ITM rows) reads rows of those keys and values, and their gradients add
  up before the one backward through the projection;
- the query pass run inside `shared.recording_queries()` keeps each layer's self-attention keys and values of the
  queries, and `shared.text_after_queries(ids, mask)` runs ITG's captions alone beside them — the queries are not
  recomputed (LAVIS's ITG reads its query pass's `past_key_values` the same way).

Both give the outputs of the plain calls (`tests/test_pretraining.py` compares them). The cross-attention and ITG's
text pass are written here against transformers' Q-Former modules (their own projections, output blocks and
FFNs), because transformers' Q-Former takes no precomputed keys and values.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xllm.blocks.qformer import QFormer, itg_attention_mask


def heads(tensor: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """`[n, tokens, hidden]` -> `[n, heads, tokens, head size]`."""
    return tensor.view(*tensor.shape[:2], -1, module.attention_head_size).transpose(1, 2)


def attend(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           mask: torch.Tensor | None) -> torch.Tensor:
    """What a `Blip2QFormerMultiHeadAttention` computes from its query, key and value heads: `[n, tokens, hidden]`."""
    dropout = module.attention_dropout if module.training else 0.0
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=module.scaling)
    return out.transpose(1, 2).reshape(*out.shape[:1], out.shape[2], -1)


class SharedPasses:
    """See the module docstring. `features`: the step's `[pictures, tokens, width]` features as the Q-Former reads
    them (after the bridge's LayerNorm)."""

    def __init__(self, qformer: QFormer, features: torch.Tensor) -> None:
        self.qformer, self.features = qformer, features
        self.layers = list(qformer.model.encoder.layer)
        self.stand_ins: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {id(features): (features, None)}
        self.projected: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> the features' keys, values
        self.query_states: dict[int, list[torch.Tensor]] = {}  # layer -> [keys, values] of the queries

    def __enter__(self) -> SharedPasses:
        for index, layer in enumerate(self.layers):
            if layer.has_cross_attention:
                module = layer.crossattention.attention
                # An instance attribute shadows the class's forward for this step only (removed on exit).
                module.forward = lambda *args, _i=index, _m=module, **kwargs: self.cross_attention(_i, _m, *args,
                                                                                                  **kwargs)
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer in self.layers:
            if layer.has_cross_attention:
                del layer.crossattention.attention.forward

    def rows(self, rows: torch.Tensor | None) -> torch.Tensor:
        """What to give the Q-Former for `features[rows]`: a stand-in of that shape (a view, no copy) that the
        cross-attention layers recognise and answer from the shared keys and values."""
        if rows is None:
            return self.features
        stand_in = self.features[:1].expand(len(rows), -1, -1)
        self.stand_ins[id(stand_in)] = (stand_in, rows)  # the tensor is kept, so its id is not reused
        return stand_in

    def cross_attention(self, index: int, module: nn.Module, hidden_states: torch.Tensor,
                        attention_mask: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
                        encoder_attention_mask: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        known = self.stand_ins.get(id(encoder_hidden_states))
        if known is None or known[0] is not encoder_hidden_states:  # features from elsewhere: the plain layer
            return type(module).forward(module, hidden_states, attention_mask, encoder_hidden_states,
                                        encoder_attention_mask, **kwargs)
        if index not in self.projected:
            self.projected[index] = (heads(module.key(self.features), module),
                                     heads(module.value(self.features), module))
        key, value = self.projected[index]
        rows = known[1]
        if rows is not None:
            key, value = key.index_select(0, rows), value.index_select(0, rows)
        return attend(module, heads(module.query(hidden_states), module), key, value, encoder_attention_mask), None

    @contextmanager
    def recording_queries(self) -> Iterator[None]:
        """Keep the self-attention keys and values of the Q-Former call made inside (the queries alone)."""
        handles = []
        for index, layer in enumerate(self.layers):
            states = self.query_states[index] = []
            for projection in (layer.attention.attention.key, layer.attention.attention.value):
                handles.append(projection.register_forward_hook(
                    lambda _module, _inputs, output, _states=states: _states.append(output)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        if any(len(states) != 2 for states in self.query_states.values()):
            self.query_states.clear()  # not one query pass: nothing reusable

    @property
    def has_queries(self) -> bool:
        return bool(self.query_states)

    def text_after_queries(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ITG's text outputs `[batch, tokens, hidden]`: each token attends to all queries (as recorded) and to the
        text up to itself, as `QFormer.joint(..., causal_text=True)` computes them."""
        model = self.qformer.model
        hidden = model.dropout(model.layernorm(self.qformer._text_embeds(input_ids).to(self.features.dtype)))
        n_query = self.query_states[0][0].shape[1]
        mask = itg_attention_mask(attention_mask, n_query, hidden.dtype)[:, :, n_query:]  # the text's rows of ITG's
        for index, layer in enumerate(self.layers):
            module = layer.attention.attention
            query_keys, query_values = self.query_states[index]
            key = torch.cat([heads(query_keys, module), heads(module.key(hidden), module)], dim=2)
            value = torch.cat([heads(query_values, module), heads(module.value(hidden), module)], dim=2)
            context = attend(module, heads(module.query(hidden), module), key, value, mask)
            hidden = layer.feed_forward_chunk(layer.attention.output(context, hidden))
        return hidden
