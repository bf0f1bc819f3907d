"""A causal-LM (instruction-tuning) job's shares: the LM head, the data owner's rows and targets,
the cached frozen prefix (:class:`~secfwt.tuning.causal_lm.CausalLMForward` runs the steps).

What each party learns is what an encoder job's parties learn, plus the public response window:
the key mask, the reply weights and the target rows ``E[y]`` are the data owner's secrets, shared;
the LM head stays with the model owner in the clear (one-sided products,
:class:`~secfwt.mpc.owned.OwnedMatrix`). In ``table_to_data_owner`` mode the data owner looks its
target rows up in the disclosed table (an untied head's table is a disclosure of its own,
``lm_head_table``); in ``private`` mode they are one-hot rows times the table, in MPC, once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from secfwt.config import JobConfig
from secfwt.data.inputs import InstructionInputs, slot_selection
from secfwt.errors import ConfigError, ModelError
from secfwt.models.decoder import DecoderModel
from secfwt.models.spec import EmbeddingMode, ModelSpec
from secfwt.models.transformer import ForwardSettings
from secfwt.mpc.disclosure import Revealable
from secfwt.roles import Role
from secfwt.runtime.inputs import share_word_embeddings
from secfwt.runtime.range_checks import OUTPUT_BOUND, RANGE_BOUND, RangeChecks
from secfwt.runtime.session import PartySession
from secfwt.tuning.causal_lm import CausalLMForward, PromptSlots, ResponseTargets, causal_prefix

#: The untied LM head's weight (V, H); a tied head has none and reads the word embeddings.
LM_HEAD = "lm_head.weight"


def check_causal_model(cfg: JobConfig, *, family_is_decoder: bool, tied: bool) -> None:
    """What a causal-LM job needs of its checkpoint, checkable from the config alone (the
    launcher runs it before any party starts, the parties again on the agreed spec)."""
    if not family_is_decoder:
        raise ModelError(
            f"model.path: {cfg.model.path} is not a causal decoder; model.head = 'causal_lm' "
            "needs a Llama, Qwen2 or Mistral checkpoint (e.g. packaged:smollm2-135m-instruct)"
        )
    if not tied and cfg.model.embedding is EmbeddingMode.TABLE_TO_DATA_OWNER:
        need = (Revealable.LM_HEAD_TABLE, Role.DATA_OWNER)
        if not cfg.terms.allows(*need):
            raise ConfigError(
                f"{cfg.source}: this model's LM head is untied from its word embeddings, and in "
                "embedding mode table_to_data_owner the data owner looks its target tokens up "
                'in it; add [[disclosure]] value = "lm_head_table" to = ["data_owner"] if '
                "both owners agree, or set model.embedding = 'private'"
            )


def lm_head_params(
    sess: PartySession, spec: ModelSpec, state: dict[str, torch.Tensor] | None
) -> dict[str, Any]:
    """A tied head's table as the model owner's :class:`OwnedMatrix` under ``lm_head.weight``
    (:meth:`DecoderModel.lm_logits` prefers it); nothing for an untied head (it is a frozen
    linear weight, shared with the others)."""
    from secfwt.mpc.owned import OwnedMatrix

    if not spec.tie_word_embeddings:
        return {}
    table = None if state is None else state[spec.word_embeddings]
    shape = spec.shape_of(spec.word_embeddings)
    return {
        LM_HEAD: OwnedMatrix.share(table, owner=Role.MODEL_OWNER.rank, shape=shape, fixed_mask=True)
    }


def _head_tables(
    sess: PartySession,
    spec: ModelSpec,
    state: dict[str, torch.Tensor] | None,
    *,
    mode: EmbeddingMode,
    frozen: dict[str, Any],
    plain_table: torch.Tensor | None,
) -> tuple[Any | None, torch.Tensor | None]:
    """(secret table, plain table) to look target rows up in: the LM head's."""
    if mode is EmbeddingMode.PRIVATE:
        return (frozen[spec.word_embeddings] if spec.tie_word_embeddings else frozen[LM_HEAD]), None
    if spec.tie_word_embeddings:
        return None, plain_table
    head = None if state is None else state[LM_HEAD]
    disclosed = sess.discloser.disclose_plain(
        head,
        owner=Role.MODEL_OWNER,
        value=Revealable.LM_HEAD_TABLE,
        to=Role.DATA_OWNER,
        shape=spec.shape_of(LM_HEAD),
        note="causal_lm target rows, embedding mode table_to_data_owner",
    )
    return None, disclosed


def causal_runner(
    sess: PartySession,
    cfg: JobConfig,
    *,
    spec: ModelSpec,
    state: dict[str, torch.Tensor] | None,
    data: InstructionInputs | None,
    frozen: dict[str, Any],
    settings: ForwardSettings,
    plain_table: torch.Tensor | None,
    n: int,
    t: int,
    cut: int,
    cached: Any | None,
    progress: Callable[..., None],
) -> tuple[CausalLMForward, Any, float, RangeChecks]:
    """Share the rows, compute (or take from a checkpoint) the frozen prefix; return the forward,
    the cache, the seconds the prefix took and the range checks of the prefix and of every
    later forward's upper layers (:class:`RangeChecks`)."""
    do, r, mode = Role.DATA_OWNER, cfg.model.response_window, cfg.model.embedding
    mask = sess.share(
        None if data is None else data.attention_mask.float(),
        owner=do,
        shape=(n, t),
        name="key mask",
    )
    weights = sess.share(
        None if data is None else data.target_weights.float(),
        owner=do,
        shape=(n, r),
        name="reply weights",
    )
    prompt = None
    p = cfg.zo.soft_prompt_length
    if p:
        slots = None if data is None else data.prompt_slots
        prompt = PromptSlots(
            slots=sess.share(
                None if slots is None else slots.float(), owner=do, shape=(n, t), name="slots"
            ),
            selection=sess.share(
                None if slots is None else slot_selection(slots, p),
                owner=do,
                shape=(n, t, p),
                name="prompt placement",
            ),
            layer=cfg.zo.prompt_layer,
        )
    secret_head, plain_head = _head_tables(
        sess, spec, state, mode=mode, frozen=frozen, plain_table=plain_table
    )
    target_rows = share_word_embeddings(
        sess,
        spec,
        mode=mode,
        input_ids=None if data is None else data.target_ids,
        shape=(n, r),
        secret_table=secret_head,
        plain_table=plain_head,
        what="target rows of the LM head",
    )
    model = DecoderModel(spec, frozen, sess.ops, settings)
    t0 = time.perf_counter()
    checks = RangeChecks(sess)
    if cached is not None:
        cache = cached
        progress(kind="phase", phase="frozen prefix loaded from the checkpoint")
    else:

        def compute(rows: list[int]) -> Any:
            ix = torch.tensor(rows)
            word = share_word_embeddings(
                sess,
                spec,
                mode=mode,
                shape=(len(rows), t),
                input_ids=None if data is None else data.input_ids[ix],
                secret_table=frozen.get(spec.word_embeddings),
                plain_table=plain_table,
            )
            slots = None if prompt is None else prompt.slots[ix]
            return causal_prefix(model, word, mask[ix], cut=cut, window=r, slots=slots)

        cache = checks.prefix(compute, n=n, batch=cfg.run.eval_batch, progress=progress)
    runner = CausalLMForward(
        ops=sess.ops,
        spec=spec,
        frozen=frozen,
        settings=settings,
        cache=cache,
        mask=mask,
        targets=ResponseTargets(rows=target_rows, weights=weights),
        cut=cut,
        window=r,
        prompt=prompt,
        guard=checks.guard(what="upper layers", bound=RANGE_BOUND),
        loss_guard=checks.guard(what="response losses", bound=OUTPUT_BOUND),
    )
    return runner, cache, time.perf_counter() - t0, checks
