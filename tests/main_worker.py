"""Run by tests/test_distributed.py under torchrun: `main.py ARGV` as the command line runs it, with two
recorders around it (main.py's code runs unchanged):
- a copy of each epoch's checkpoint.pth as checkpoint.pth.epochN (tinyrun.keeping_checkpoints);
- the number of backward passes whose gradients DDP all-reduced, counted by a comm hook that then runs
  DDP's own all-reduce (the first bucket of each pass counts once).
Each rank writes {"code": exit code, "all_reduces": n} to $RESULT_DIR/rank<R>.json.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook  # noqa: E402

import main  # noqa: E402
from tinyrun import keeping_checkpoints  # noqa: E402

all_reduces = []
wrap_ddp = main.wrap_ddp


def counting_wrap_ddp(model, args, device):
    ddp = wrap_ddp(model, args, device)

    def counting_allreduce(process_group, bucket):
        if bucket.index() == 0:
            all_reduces.append(1)
        return allreduce_hook(process_group, bucket)

    ddp.register_comm_hook(None, counting_allreduce)  # None: the default process group
    return ddp


main.wrap_ddp = counting_wrap_ddp
with keeping_checkpoints():
    code = main.cli(sys.argv[1:])
with open(os.path.join(os.environ['RESULT_DIR'], f'rank{os.environ["RANK"]}.json'), 'w') as f:
    json.dump(dict(code=code, all_reduces=len(all_reduces)), f)
# as tests/dist_worker.py: leave without interpreter finalization, which gloo's threads can abort
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
