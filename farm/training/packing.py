"""Rows and batches: pack short examples into shared sequences, and collate rows into model inputs.

A *row* is a list of examples that share one sequence: one example without packing, several with it. A packed row
carries `position_ids` that restart at 0 for each example and no `attention_mask`. transformers (5.x) reads that
as packed sequences: with sdpa or eager attention it builds a block-diagonal causal mask
(`masking_utils.find_packed_sequence_indices`), with flash attention it derives `cu_seqlens` from the positions
when the batch is one row. So no token attends across an example boundary; tests/test_training_data.py checks
that a packed example's logits equal the same example's logits alone.

Labels are shifted here (`targets[t]` is the label of token t+1), so the loss is one cross-entropy over
`logits` and `targets` without a copy per step. Each example's first label is already -100
(farm.training.data), so the last token of one packed example never learns to predict the next example.
"""

from __future__ import annotations

from dataclasses import dataclass

from farm.training.data import IGNORE_INDEX, Example


@dataclass
class Batch:
    """Model inputs for one micro-batch, plus counts known without touching the device."""

    input_ids: object  # torch.LongTensor [rows, length]
    targets: object  # torch.LongTensor [rows, length]: label of the next token, -100 = no loss
    attention_mask: object | None  # padded (unpacked) batches only
    position_ids: object | None  # packed batches only
    tokens: int  # real (non-pad) tokens
    target_tokens: int  # tokens that carry loss

    def model_inputs(self) -> dict:
        """Keyword arguments for the model's forward (no cache: this is training)."""
        kwargs = {"input_ids": self.input_ids, "use_cache": False}
        if self.attention_mask is not None:
            kwargs["attention_mask"] = self.attention_mask
        if self.position_ids is not None:
            kwargs["position_ids"] = self.position_ids
        return kwargs

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.targets), move(self.attention_mask), move(self.position_ids),
                     self.tokens, self.target_tokens)


def pack_examples(examples: list[Example], max_len: int) -> list[list[Example]]:
    """Best-fit decreasing: longest example first, each into the row it fills most tightly, else a new row.

    Rows come out nearly all exactly full (greedy packing in the given order leaves each row's tail empty whenever
    the next example does not fit, ~9% padding on short chat data; this, under 1%), so fewer rows carry the same
    tokens. Deterministic for the same examples (ties keep the given order), so a resumed run rebuilds the same
    rows. O(n log n) through a sorted list of the open rows' free space. Every example is at most max_len long
    already (farm.training.data truncates or drops the longer ones).
    """
    import bisect

    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))  # stable: ties in the given order
    rows: list[list[Example]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted; full rows leave the list
    for i in order:
        ex = examples[i]
        k = bisect.bisect_left(free, (len(ex), -1))
        if k < len(free):
            space, row = free.pop(k)
        else:
            space, row = max_len, len(rows)
            rows.append([])
        rows[row].append(ex)
        if space - len(ex) > 0:
            bisect.insort(free, (space - len(ex), row))
    return rows


def to_rows(examples: list[Example], max_len: int, packing: bool) -> list[list[Example]]:
    """The training rows: packed ones, or one example per row."""
    return pack_examples(examples, max_len) if packing else [[ex] for ex in examples]


def collate(rows: list[list[Example]], pad_id: int, *, packed: bool, flatten: bool = False) -> Batch:
    """Tensors for a micro-batch of rows, right-padded to the longest row.

    packed: give restarting position_ids and no attention mask (padding becomes one more isolated sequence with
    no loss). flatten: join all rows into a single row without padding, the layout flash attention needs to see
    packed sequences.
    """
    import torch

    seqs, tgts, poss = [], [], []
    for row in rows:
        ids, tg, pos = [], [], []
        for ex in row:
            ids += ex.input_ids
            # Shift: token t is trained to predict labels[t+1]; the example's last token predicts nothing.
            tg += ex.labels[1:] + [IGNORE_INDEX]
            pos += range(len(ex))
        seqs.append(ids)
        tgts.append(tg)
        poss.append(pos)
    if flatten:
        seqs, tgts, poss = [sum(seqs, [])], [sum(tgts, [])], [sum(poss, [])]
    tokens = sum(len(s) for s in seqs)
    target_tokens = sum(ex.target_count for row in rows for ex in row)  # cached per example (farm.training.data)
    length = max(len(s) for s in seqs)
    mask = []
    for ids, tg, pos in zip(seqs, tgts, poss):
        pad = length - len(ids)
        mask.append([1] * len(ids) + [0] * pad)
        ids += [pad_id] * pad
        tg += [IGNORE_INDEX] * pad
        pos += range(pad)
    input_ids = torch.tensor(seqs, dtype=torch.long)
    targets = torch.tensor(tgts, dtype=torch.long)
    if packed:
        return Batch(input_ids, targets, None, torch.tensor(poss, dtype=torch.long), tokens, target_tokens)
    has_pad = tokens < input_ids.numel()
    # Without padding the mask is all ones: leaving it out lets sdpa take its plain causal path.
    attention = torch.tensor(mask, dtype=torch.long) if has_pad else None
    return Batch(input_ids, targets, attention, None, tokens, target_tokens)

