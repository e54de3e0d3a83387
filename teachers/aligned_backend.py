"""A teacher with its own tokenizer, writing targets in the student's token space S (`--align-tokenizer`).

Wraps the transformers backend (`HFBackend`). For each packed window of S ids, `teachers.align` builds the
teacher's own input (the window's text tokenized by the teacher) and the position alignment; the teacher
runs on its tokens (right-padded in a batch: attention is causal, so padding after a sequence changes none
of its positions); `teachers.head.aligned_head` projects the distribution at every aligned position onto S
and gives the teacher's log-prob of each of its own next tokens, from which the observed S token's exact
log-prob is summed. Pooled states stay the teacher's own: the mean over the teacher's tokens of the window.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from common.errors import ConfigError
from common.packing import PackedBatch
from common.tokenizer import tokenizer_fingerprint
from storage.manifest import ALIGNMENT_STATS, TeacherInfo
from storage.records import TeacherTargets
from teachers.align import MAP_KINDS, VocabMap, WindowAligner, build_vocab_map, token_table
from teachers.errors import TeacherLoadError


class AlignedBackend:
    """TeacherBackend producing S-space targets from an `HFBackend` and the two tokenizers."""

    def __init__(self, inner: Any, teacher_tok: Any, student_tok: Any, *, student_tokenizer: str,
                 teacher_tokenizer: str, specials_as_text: bool = False) -> None:
        if not hasattr(inner, "final_hidden") or not hasattr(inner, "weight"):
            raise TeacherLoadError(f"the {getattr(inner, 'cfg', None) and inner.cfg.backend} backend cannot "
                                   "align tokenizers (only the hf backend can)")
        self.inner = inner
        self.cfg = inner.cfg
        self.teacher_tok, self.student_tok = teacher_tok, student_tok
        self.vocab_map: VocabMap = build_vocab_map(teacher_tok, student_tok, teacher_vocab=inner.vocab_size)
        if self.vocab_map.target.shape[0] != inner.vocab_size:
            raise TeacherLoadError(f"the teacher's tokenizer has {self.vocab_map.target.shape[0]} ids, more than "
                                   f"its output layer ({inner.vocab_size}); the tokenizer does not belong to it")
        self.aligner = WindowAligner(teacher_tok, student_tok, token_table(student_tok),
                                     specials_as_text=specials_as_text)
        self.vocab_size = self.vocab_map.student_vocab
        self.entropy_kind = "exact"
        self.observed_logprob = False  # an aligned cache's observed_logprob column comes with its alignment
        self.pooled_dims = dict(inner.pooled_dims)
        self.pad_id = int(teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else teacher_tok.eos_token_id)
        self.alignment = {
            "tokenizer": student_tokenizer,
            "teacher_tokenizer": teacher_tokenizer,
            "teacher_tokenizer_fingerprint": tokenizer_fingerprint(teacher_tok),
            "teacher_vocab_size": int(inner.vocab_size),
            "vocab_map": self.vocab_map.counts(),
            "vocab_map_sha256": self.vocab_map.fingerprint(),
            "teacher_prefix": self.aligner.prefix,
        }
        if specials_as_text:  # conversations only, so a text cache's alignment entry is unchanged
            self.alignment["student_specials"] = "text"
        """The manifest's `alignment` object (fixed for a run; part of RUN_FIELDS)."""
        self.notes = dict(inner.notes, alignment="positions aligned by byte end offsets; vocab mapped to the "
                          "first S token of each teacher token's text (teachers/align.py)")
        import torch

        device = inner.weight.device
        self._map = torch.from_numpy(self.vocab_map.target).to(device)
        self._whole = torch.from_numpy(self.vocab_map.kind == MAP_KINDS.index("whole")).to(device)

    def info(self) -> TeacherInfo:
        return self.inner.info()

    def _check_positions(self, batch: PackedBatch, lengths: list[int]) -> None:
        """ConfigError for the first window whose teacher tokens exceed the teacher's positions: `seq_len`
        counts S tokens, and the teacher's own tokenization of the same text may be longer. Raised before the
        forward, so no target past the positions is computed or written."""
        limit = getattr(self.inner, "max_positions", None)
        if limit is None:
            return
        for seq_id, n in zip(batch.seq_ids, lengths, strict=True):
            if n > limit:
                raise ConfigError(f"window seq id {int(seq_id)} is {n} teacher tokens (its "
                                  f"{batch.input_ids.shape[1]} tokens of the student's tokenizer), more than the "
                                  f"teacher's max_position_embeddings {limit}; lower --seq-len (with a new "
                                  "--output: a cache keeps one seq_len)")

    def compute(self, batch: PackedBatch) -> TeacherTargets:
        import torch

        from teachers.head import aligned_head

        inner, k = self.inner, self.cfg.top_k
        b, seq_len = len(batch), batch.input_ids.shape[1]
        windows = [self.aligner.align(row) for row in batch.input_ids]
        lengths = [w.teacher_ids.shape[0] for w in windows]
        self._check_positions(batch, lengths)
        lt = max(lengths)
        ids = np.full((b, lt), self.pad_id, dtype=np.int64)
        for i, w in enumerate(windows):
            ids[i, : lengths[i]] = w.teacher_ids
        device = inner.model.device
        ids_t = torch.from_numpy(ids).to(device)
        valid = torch.from_numpy(np.arange(lt)[None, :] < np.asarray(lengths)[:, None])  # [B, Lt] bool
        with torch.inference_mode():
            if not inner._checked:
                inner._self_check(ids_t[:1, : min(32, lengths[0])])
            inner._captured.clear()
            inner._capture_full = True
            try:
                hidden = inner.final_hidden(ids_t)  # [B, Lt, H]
            finally:
                inner._capture_full = False
            flat_valid = valid.reshape(-1).to(device)
            rows = hidden.reshape(b * lt, -1)[flat_valid].to(inner.weight.device)  # [R, H], R = sum(lengths)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            project = np.zeros(rows.shape[0], dtype=bool)
            next_ids = np.zeros(rows.shape[0], dtype=np.int64)
            for i, w in enumerate(windows):
                src = w.source[w.source >= 0]
                project[offsets[i] + src] = True
                next_ids[offsets[i]: offsets[i + 1] - 1] = w.teacher_ids[1:]
            top_ids, top_lp, ent, next_lp, m_whole, m_unmapped = aligned_head(
                rows, inner.weight, vocab_map=self._map, map_whole=self._whole, student_vocab=self.vocab_size,
                k=k, project=torch.from_numpy(project), next_ids=torch.from_numpy(next_ids),
                temperature=self.cfg.temperature, chunk_size=self.cfg.head_chunk_size, bias=inner.bias,
                logit_scale=inner.logit_scale, softcap=inner.softcap)
            pooled = {}
            mask_f = valid.to(device=device, dtype=torch.float32).unsqueeze(-1)  # [B, Lt, 1]
            for layer in inner.pooled_layers:
                state = hidden if layer == inner.num_layers - 1 else inner._captured[layer]
                pooled[layer] = ((state.float() * mask_f).sum(1) / mask_f.sum(1)).cpu().numpy()  # [B, d]
            inner._captured.clear()
        top_ids, top_lp, ent = top_ids.cpu().numpy(), top_lp.cpu().numpy(), ent.cpu().numpy()
        next_lp = next_lp.cpu().numpy().astype(np.float64)
        m_whole, m_unmapped = m_whole.cpu().numpy().astype(np.float64), m_unmapped.cpu().numpy().astype(np.float64)
        out_ids = np.broadcast_to(np.arange(k, dtype=np.int32), (b, seq_len, k)).copy()
        out_lp = np.full((b, seq_len, k), -np.inf, dtype=np.float32)
        out_ent = np.full((b, seq_len), np.nan, dtype=np.float32)
        mask = np.zeros((b, seq_len), dtype=np.uint8)
        observed = np.full((b, seq_len), np.nan, dtype=np.float32)
        stats = {key: np.zeros(b, dtype=np.float64) for key in ALIGNMENT_STATS}
        for i, w in enumerate(windows):
            t = np.flatnonzero(w.source >= 0)
            r = offsets[i] + w.source[t]
            out_ids[i, t], out_lp[i, t], out_ent[i, t] = top_ids[r], top_lp[r], ent[r]
            mask[i, t] = 1
            # observed S token t+1: teacher tokens u0+1..u1 cover exactly its bytes
            prefix = np.concatenate([[0.0], np.cumsum(np.where(w.counts[1:], next_lp[offsets[i]: offsets[i + 1] - 1],
                                                                0.0))])  # prefix[j] = sum over rows < j
            ok = np.flatnonzero(w.chunk_start >= 0)
            observed[i, ok] = prefix[w.chunk_stop[ok]] - prefix[w.chunk_start[ok]]
            whole, unmapped = m_whole[r], m_unmapped[r]
            stats["positions"][i] = seq_len
            stats["aligned"][i] = t.size
            stats["observed"][i] = ok.size
            stats["mass_whole"][i] = whole.sum()
            stats["mass_unmapped"][i] = unmapped.sum()
            stats["mass_partial"][i] = (1.0 - whole - unmapped).sum()
        return TeacherTargets(
            seq_ids=np.asarray(batch.seq_ids, dtype=np.int64),
            input_ids=np.asarray(batch.input_ids, dtype=np.int32),
            topk_ids=out_ids, topk_logprobs=out_lp, entropy=out_ent, pooled=pooled,
            target_mask=mask, observed_logprob=observed, stats=stats,
        )
