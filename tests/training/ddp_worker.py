"""Run by tests/training/test_ddp.py under torchrun: train, then dump this rank's parameters."""

import sys

import torch

import multitoken

out, data, family = sys.argv[1], sys.argv[2], sys.argv[3]
result = multitoken.train(
    preset="tiny",
    family=family,
    depth=2,
    data=[data],
    out=out,
    max_steps=4,
    seq_len=32,
    batch_size=2,
    grad_accum=2,
    eval_every=4,
    eval_batches=1,
    save_every=4,
    device="cpu",
)
rank = torch.distributed.get_rank()
state = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
torch.save(state, f"{out}/params-rank{rank}.pt")
torch.distributed.destroy_process_group()
