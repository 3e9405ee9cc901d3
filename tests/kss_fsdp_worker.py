"""One rank of tests/test_kss_trainers.py::test_fsdp_kss_gradient_equals_the_one_process_reference.

    python -m torch.distributed.run --nproc_per_node 2 tests/kss_fsdp_worker.py OUT_DIR

The tiny GPT-2 of kss_ddp_grad_worker.py (dropout 0), sharded with torch's FSDP2 (``fully_shard`` on every
block and on the root; gloo on CPU: transformers' Trainer runs DDP instead of FSDP on CPU, so this drives the
KSS step by hand, as a custom accelerate/torch loop would).  Each rank runs one forward of its 4 sequences
under ``KSSStep`` (the worker's KSS settings, step 0, micro-batch 0) and backpropagates the KSS term alone;
FSDP reduce-scatters the gradients (their mean over ranks).  Each rank writes rank<N>.pt: its input_ids and
every block parameter's full gradient (the shards gathered).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kss_ddp_grad_worker import KSS, block_parameters, model_without_dropout
from test_kss import Tokens
from torch.distributed.fsdp import fully_shard

from hf_rksp import KSSConfig
from hf_rksp.models.blocks import find_blocks
from hf_rksp.training.kss import KSSStep


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = model_without_dropout().train()
    _, blocks = find_blocks(model)
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    ids = Tokens(n=8, t=64).x[rank * 4:(rank + 1) * 4]
    with KSSStep(list(blocks), KSSConfig(**KSS), step=0, micro=0) as k:
        loss = model(input_ids=ids, labels=ids).loss
    res = k.result(loss, 1.0)
    assert res.skips == {} and res.term is not None
    res.term.backward()
    grads = {n: p.grad.full_tensor().detach().clone() for n, p in block_parameters(model).items()}
    sharded = type(next(iter(block_parameters(model).values()))).__name__
    torch.save({"world": world, "ids": ids, "grads": grads, "param_type": sharded,
                "chosen": torch.tensor(res.chosen)}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
