"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU).

1. Evaluation without --dist-eval: only rank 0 runs the model, every rank gets its numbers.
2. A loss that is NaN on rank 1 alone stops both ranks at the same point (the next log step), with
   the same message naming the step and the rank where it appeared.
Each rank writes its findings to $RESULT_DIR/rank<R>.json.
"""
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main  # noqa: E402
from engine import train_one_epoch  # noqa: E402
from utils import NonFiniteLossError  # noqa: E402

dist.init_process_group('gloo')
rank = dist.get_rank()
torch.manual_seed(0)  # same weights on both ranks
model = nn.Linear(3, 2)
batches = [(torch.randn(2, 3), torch.tensor([0, 1])) for _ in range(4)]

calls = []
model.register_forward_hook(lambda *_: calls.append(1))
stats = main.run_eval(SimpleNamespace(distributed=True, dist_eval=False, eval_set='in1k'), batches, model,
                      torch.device('cpu'), torch.float32)
eval_forwards = len(calls)

ddp = nn.parallel.DistributedDataParallel(model)


def nan_on_rank1_step2(inputs, outputs, targets):
    loss = F.cross_entropy(outputs, targets)
    step = len(calls) - eval_forwards - 1
    return loss * float('nan') if rank == 1 and step == 2 else loss


stopped = None
try:
    train_one_epoch(ddp, nan_on_rank1_step2, batches, torch.optim.SGD(model.parameters(), lr=0.1),
                    torch.device('cpu'), 0, torch.amp.GradScaler('cpu', enabled=False), accum_iter=4)
except NonFiniteLossError as err:
    stopped = str(err)
with open(os.path.join(os.environ['RESULT_DIR'], f'rank{rank}.json'), 'w') as f:
    json.dump(dict(eval_forwards=eval_forwards, acc1=stats['acc1'], stopped=stopped), f)
dist.destroy_process_group()
# Leave without interpreter finalization: gloo worker threads may still be dropping the last reference to
# a collective's tensors, and a thread that needs the GIL during finalization aborts the process
# ("terminate called without an active exception", seen in CI and reproduced in a loop of plain all_gathers).
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
