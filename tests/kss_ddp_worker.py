"""One rank of the two-process (gloo, CPU) KSS run of tests/test_kss_trainers.py::test_ddp_auto_*.

    python -m torch.distributed.run --nproc_per_node 2 tests/kss_ddp_worker.py OUT_DIR MODE

Each rank profiles its own shard for mode="auto" (its M differs from the other's); the thresholds are put
between the two ranks' M so that ranks deciding alone would disagree (and, before the fix, hang).  Each rank
writes rank<N>.json: the decision, the KSS state, its log history and a checksum of its weights.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_kss import Tokens, targs, tiny_lm  # noqa: E402

from hf_rksp import KSSConfig, KSSTrainer  # noqa: E402


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    model = tiny_lm("gpt2")
    args = targs(out, max_steps=4, logging_steps=2, per_device_train_batch_size=4, ddp_backend="gloo")
    tr = KSSTrainer(model=model, args=args, train_dataset=Tokens(n=64, t=64),
                    kss_config=KSSConfig(mode=mode, every_n_steps=1, alpha=1.0, auto_tokens=256))
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "auto":
        m_local = tr.kss_auto_statistics()[0]
        ms = [None] * world
        dist.all_gather_object(ms, m_local)
        lo, hi = min(ms), max(ms)
        thr = 0.7 * lo + 0.3 * hi  # the rank with lo alone: off (lo < thr); the other alone: on; their mean: on
        tr.kss_config = dataclasses.replace(tr.kss_config, auto_low=thr, auto_threshold=thr)
    tr.train()
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world": world, "auto": tr.kss_state.auto, "kss_steps": tr.kss_state.kss_steps,
        "log_history": tr.state.log_history, "checksum": checksum}))


if __name__ == "__main__":
    main()
