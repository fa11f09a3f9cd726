"""Run by tests/test_cuda_paths.py under `torchrun --nproc_per_node 2` (gloo, CPU): main.py's DDP pieces.

utils.init_distributed joins the group (with --dist-timeout); a tiny ViT-5 trains 12 steps through
main.wrap_ddp with --accum_iter 2 and the EMA; then main.run_eval evaluates the EMA with the default
settings (every rank its shard). Each rank writes what it saw to $RESULT_DIR/rank<R>.json.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main  # noqa: E402
import utils  # noqa: E402
from engine import train_one_epoch  # noqa: E402

torch.set_num_threads(1)
args = main.parse_args(['--dist-timeout', '5', '--model-ema-decay', '0.9', '--accum_iter', '2'])
utils.init_distributed(args, 'cpu')
rank, cpu = utils.get_rank(), torch.device('cpu')
torch.manual_seed(0)  # the same weights on both ranks
model = main.build_model(main.parse_args(['--model', 'vit5_tiny', '--model-kwargs', 'depth=2', 'embed_dim=48',
                                          'num_heads=2', '--input-size', '32']), 3)
ddp = main.wrap_ddp(model, args, cpu)
versions = [b._version for b in model.buffers()]  # after DDP's construction, which syncs them once
ema = main.build_ema(args, model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
steps = []
optimizer.register_step_post_hook(lambda *_: steps.append(1))
g = torch.Generator().manual_seed(rank)  # each rank its own data
batches = [(torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 3, (2,), generator=g)) for _ in range(12)]
train_one_epoch(ddp, lambda inputs, outputs, targets: F.cross_entropy(outputs, targets), batches, optimizer, cpu, 0,
                torch.amp.GradScaler('cpu', enabled=False), model_ema=ema, accum_iter=args.accum_iter, print_freq=10)
stats = main.run_eval(args, batches[:3], ema.module, cpu, torch.float32)
result = dict(world_size=utils.get_world_size(), optimizer_steps=len(steps), broadcast_buffers=ddp.broadcast_buffers,
              cache_entries=dict(model=len(model._rope_cache), ema=len(ema.module._rope_cache)),
              buffer_versions_unchanged=versions == [b._version for b in model.buffers()],
              eval_n=stats['n'], eval_acc1=stats['acc1'])
with open(os.path.join(os.environ['RESULT_DIR'], f'rank{rank}.json'), 'w') as f:
    json.dump(result, f)
dist.destroy_process_group()
# as tests/dist_worker.py: leave without interpreter finalization (gloo threads and the GIL)
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
