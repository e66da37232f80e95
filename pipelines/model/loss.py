"""The training loss: cross-entropy on the SQL tokens only, computed where it is needed.

The LM head runs only at SQL positions (the prompt is ~90% of each sequence, so this skips most
of the vocabulary projection), and a batch's shared system + DDL prefix runs once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipelines.model.batches import IGNORE


def completion_loss(model, batch: dict[str, torch.Tensor], full_logits: bool = False):
    """Mean cross-entropy over the SQL tokens, and their count.

    The fast path runs the batch's shared prefix (system line + DDL, ~75% of the tokens) once
    and reuses its key/value cache for every example, then applies the LM head only at SQL
    positions. With `full_logits` every example runs in full and the head runs at every
    position, as a plain `model(labels=...)` does (the baseline `make bench` compares to)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    prefix = 0 if full_logits else int(batch.get("prefix_len", 0))
    if prefix:
        shared = decoder(input_ids=ids[:1, :prefix], use_cache=True).past_key_values
        shared.batch_repeat_interleave(ids.shape[0])
        hidden = decoder(
            input_ids=ids[:, prefix:], attention_mask=mask, past_key_values=shared
        ).last_hidden_state
    else:
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    # hidden[:, j] is position prefix + j and predicts the token after it.
    targets = labels[:, prefix + 1 :]
    hidden = hidden[:, :-1]
    keep = targets != IGNORE
    if full_logits:
        logits = head(hidden).float()
        return F.cross_entropy(logits[keep], targets[keep]), int(keep.sum())
    logits = head(hidden[keep]).float()
    return F.cross_entropy(logits, targets[keep]), int(keep.sum())


class CompletionLoss(torch.nn.Module):
    """`completion_loss` as a module's forward: DDP and FSDP sync and gather only around the
    forward of the module they wrap, and the fast path calls the decoder directly."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        # The layers FSDP shards one by one (accelerate reads this for its auto-wrap policy).
        self._no_split_modules = getattr(model.get_base_model(), "_no_split_modules", None)

    def forward(self, batch: dict[str, torch.Tensor]):
        return completion_loss(self.model, batch)


@torch.no_grad()
def eval_loss(loss_module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean loss per SQL token over the dev batches (dropout off)."""
    loss_module.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss, n = loss_module(batch)
        total, count = total + loss.item() * n, count + n
    loss_module.train()
    return total / max(count, 1)
