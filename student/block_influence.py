"""Block Influence (ShortGPT, Men et al. 2024): which decoder blocks of a teacher `init-student` keeps when
`--keep-layers` is a count N.

`BI_i = 1 - mean_tokens cos(x_i, y_i)`, where `x_i` is the hidden state entering block i and `y_i` the one
leaving it, averaged over every token of a calibration slice of the corpus (packed exactly as `precompute`
packs it). A block that barely turns its input has low BI and is the cheapest to drop; the N blocks with the
highest BI are kept. It was chosen because it is cheap (one forward pass, no gradients, no search over
subsets), published with evidence that it ranks blocks well on decoder LMs, and needs nothing but the hidden
states. Its limit: it scores blocks one at a time, so it cannot see that two blocks are jointly redundant.
"""

from __future__ import annotations

from typing import Any

from common.errors import ConfigError
from student.config import InitStudentConfig


def decoder_blocks(model: Any) -> Any:
    """`model.model.layers` (an nn.ModuleList); ConfigError for any other layout."""
    import torch

    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"{type(model).__name__} has no model.model.layers ModuleList; init-student prunes "
                          "decoder-only transformers laid out like Llama, Qwen2 or Gemma3")
    return layers


def calibration_windows(cfg: InitStudentConfig, tokenizer: Any) -> Any:
    """[S, seq_len] int64: the first calibration_tokens of the corpus, packed as `precompute` packs."""
    import numpy as np
    import torch

    from common.corpus import CorpusConfig, iter_documents
    from common.packing import pack_documents

    assert cfg.dataset is not None
    corpus = CorpusConfig(dataset=cfg.dataset, dataset_config=cfg.dataset_config, split=cfg.split,
                          text_field=cfg.text_field, max_tokens=cfg.calibration_tokens)
    batches = list(pack_documents(iter_documents(corpus), tokenizer, seq_len=cfg.seq_len,
                                  max_tokens=cfg.calibration_tokens))
    if not batches:
        raise ConfigError(f"{cfg.dataset} holds fewer than --seq-len {cfg.seq_len} tokens for calibration")
    return torch.from_numpy(np.concatenate([b.input_ids for b in batches]).astype(np.int64))


def block_influence(model: Any, windows: Any, *, batch_size: int) -> list[float]:
    """ShortGPT Block Influence of every block: 1 - cos(block input, block output), mean over all tokens.

    `windows` [S, L] int64 token windows. Returns one float per block, in block order. Inputs and outputs
    are captured with forward hooks (pre-hook on the hidden states going in, hook on those coming out), so
    the last block is scored before the final norm, like every other block.
    """
    import torch

    layers = decoder_blocks(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    inputs: dict[int, torch.Tensor] = {}

    def pre(i: int):
        def hook(_module, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def post(i: int):
        def hook(_module, _args, _kwargs, output):
            out = output[0] if isinstance(output, tuple) else output  # [B, L, H]
            cos = torch.nn.functional.cosine_similarity(inputs.pop(i).double(), out.double(), dim=-1)  # [B, L]
            sums[i] += (1.0 - cos).sum().cpu()
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post(i), with_kwargs=True))
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_size):
                chunk = windows[start: start + batch_size]
                model.model(input_ids=chunk, use_cache=False)
                count += chunk.numel()
    finally:
        for h in handles:
            h.remove()
    return (sums / count).tolist()


def choose_by_influence(scores: list[float], n: int) -> list[int]:
    """The `n` blocks with the highest scores, in block order (ties: the earlier block is kept)."""
    if not 1 <= n <= len(scores):
        raise ConfigError(f"--keep-layers {n}: the teacher has {len(scores)} blocks")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:n])
