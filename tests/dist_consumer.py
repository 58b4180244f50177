"""One rank of a DDP-style job reading its share of an epoch (run under torchrun, gloo)."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from softserve.client import Client

url, out = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo")
with Client(url) as client:
    batches = list(client.labelset("tiny").batches(epoch=1, batch_size=5))  # rank from dist
rank = dist.get_rank()
(out / f"rank-{rank}.json").write_text(
    json.dumps(
        {"batches": len(batches), "indices": [i for b in batches for i in b.indices.tolist()]}
    )
)
dist.barrier()
dist.destroy_process_group()
