"""The data owner's inputs as secret shares: labels, masks, and input embeddings (both modes)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from secfwt.data.inputs import DataOwnerInputs
from secfwt.models.spec import EmbeddingMode, ModelSpec, Pooling
from secfwt.mpc.disclosure import Revealable
from secfwt.roles import Role
from secfwt.runtime.session import PartySession
from secfwt.tuning.forward import mean_pool_weights

#: One-hot rows shared per chunk in private mode (bounds memory: chunk * T * V int64 per party).
_ONEHOT_CHUNK_TOKENS = 4096


def disclose_table(
    sess: PartySession, spec: ModelSpec, state: dict[str, torch.Tensor] | None
) -> torch.Tensor | None:
    """TABLE_TO_DATA_OWNER: the model owner sends its word-embedding table to the data owner."""
    shape = spec.shape_of(spec.word_embeddings)
    table = None if state is None else state[spec.word_embeddings]
    return sess.discloser.disclose_plain(
        table,
        owner=Role.MODEL_OWNER,
        value=Revealable.EMBEDDING_TABLE,
        to=Role.DATA_OWNER,
        shape=shape,
        note="embedding mode table_to_data_owner",
    )


def share_word_embeddings(
    sess: PartySession,
    spec: ModelSpec,
    *,
    mode: EmbeddingMode,
    input_ids: torch.Tensor | None,
    shape: tuple[int, int],
    secret_table: Any | None,
    plain_table: torch.Tensor | None,
    what: str = "input embeddings",
) -> Any:
    """Secret-shared word embeddings (N, T, H) of the data owner's ``input_ids``.

    PRIVATE: the data owner shares one-hot rows and the product with the secret table is
    computed in MPC, so neither ids nor table leave their owner. TABLE_TO_DATA_OWNER: the data
    owner, holding the disclosed table, looks its ids up locally and shares the result. Any
    (V, H) table works the same way (a causal LM's head rows of its target tokens: ``what``
    names them in errors); ``secret_table`` may be shared or the model owner's
    (:class:`~secfwt.mpc.owned.OwnedMatrix`).
    """
    n, t = shape
    h = spec.hidden_size
    if mode is EmbeddingMode.TABLE_TO_DATA_OWNER:
        emb = None
        if sess.role is Role.DATA_OWNER:
            assert plain_table is not None and input_ids is not None
            emb = plain_table[input_ids]  # (N, T, H)
        return sess.share(emb, owner=Role.DATA_OWNER, shape=(n, t, h), name=what)
    from secfwt.crypten_compat import crypten

    v = spec.vocab_size
    rows_per_chunk = max(1, _ONEHOT_CHUNK_TOKENS // max(t, 1))
    parts = []
    for s in range(0, n, rows_per_chunk):
        e = min(n, s + rows_per_chunk)
        onehot = None
        if sess.role is Role.DATA_OWNER:
            assert input_ids is not None
            onehot = F.one_hot(input_ids[s:e], v).to(torch.float32)
        x = sess.share(onehot, owner=Role.DATA_OWNER, shape=(e - s, t, v), name=f"one-hot {what}")
        parts.append(sess.ops.weight_matmul(x, secret_table))  # (n_chunk, T, H)
    return parts[0] if len(parts) == 1 else crypten.cat(parts, dim=0)


def embed_tokens(
    sess: PartySession,
    spec: ModelSpec,
    state: dict[str, torch.Tensor] | None,
    *,
    mode: EmbeddingMode,
    input_ids: torch.Tensor | None,
    shape: tuple[int, int],
    secret_table: Any | None,
) -> Any:
    """:func:`share_word_embeddings` in either mode, disclosing the table first when the mode is
    TABLE_TO_DATA_OWNER (``state``: the model owner's weights, None elsewhere)."""
    plain_table = (
        disclose_table(sess, spec, state) if mode is EmbeddingMode.TABLE_TO_DATA_OWNER else None
    )
    return share_word_embeddings(
        sess,
        spec,
        mode=mode,
        input_ids=input_ids,
        shape=shape,
        secret_table=secret_table,
        plain_table=plain_table,
    )


def share_rows(
    sess: PartySession,
    data: DataOwnerInputs | None,
    *,
    n: int,
    t: int,
    num_labels: int,
    pooling: Pooling,
) -> tuple[Any, Any, Any]:
    """Shares of the one-hot labels (n, C), the attention mask (n, t) and, for mean pooling,
    the pooling weights (n, t) (else None). ``data`` is the data owner's, None elsewhere."""
    do = Role.DATA_OWNER
    labels = None if data is None else F.one_hot(data.labels, num_labels).float()
    onehot = sess.share(labels, owner=do, shape=(n, num_labels), name="labels")
    am = None if data is None else data.attention_mask.float()
    mask = sess.share(am, owner=do, shape=(n, t), name="attention mask")
    pool_w = None
    if pooling is Pooling.MEAN:
        pw = None if data is None else mean_pool_weights(data.attention_mask).float()
        pool_w = sess.share(pw, owner=do, shape=(n, t), name="pooling weights")
    return onehot, mask, pool_w
