"""Run under torchrun (tests/test_distributed.py): the loss and the gradients of the tiny model
sharded with mr1fast's FSDP2 set-up equal those of the whole model in one process, for every
loss type, when each rank computes its share of the batch weighted by micro_batch_weight.
Exits 1 (naming the mismatches) when they do not."""
import sys

import torch
import torch.distributed as dist

import mr1fast.rollout  # noqa: F401  (the torchvision shim, before transformers)
from mr1fast.loss import grpo_loss, micro_batch_weight
from mr1fast.trainer.distributed import init_world, shard
from mr1fast.trainer.model import (Policy, PromptEncoder, completion_hidden, encode_images,
                                   lm_head_weight, load_model)
from mr1fast.trainer.data import make_counting, question


def main(model_dir: str) -> int:
    world, device = init_world(torch.device("cpu"), 120)
    torch.manual_seed(0)
    encoder = PromptEncoder(model_dir)
    rows = make_counting(2, seed=3)
    prompts = encoder.encode([r["image"] for r in rows], [question(r["problem"]) for r in rows],
                             device)
    B, C = 8, 6
    ids = torch.randint(10, 200, (B, C))
    mask = (torch.rand(B, C) > 0.3).float()
    adv = torch.randn(B)
    ref = torch.randn(B, C) * 0.1 - 5
    prompt_index = torch.arange(2).repeat_interleave(4)

    def loss_of(model, rows, loss_type):
        unique, local = torch.unique(prompt_index[rows], return_inverse=True)
        sub = prompts.select(unique)
        hidden = completion_hidden(model, sub, encode_images(model, sub), local, ids[rows],
                                   mask[rows])
        loss, _ = grpo_loss(hidden, lm_head_weight(model), ids[rows], adv[rows],
                            mask=mask[rows], ref_logp=ref[rows], beta=0.05, loss_type=loss_type,
                            max_completion_length=C, check_values=False)
        return loss * micro_batch_weight(loss_type, mask[rows], total_sequences=B,
                                         total_tokens=mask.sum())

    bad = []
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        whole = Policy(load_model(model_dir, device=device, dtype=torch.float32))
        whole(loss_of, slice(0, B), loss_type).backward()
        want = {n: p.grad for n, p in whole.model.named_parameters() if p.grad is not None}
        sharded = shard(Policy(load_model(model_dir, device=device, dtype=torch.float32)), world,
                        compute_dtype=torch.float32)
        mine = world.my_share(B)
        loss = sharded(loss_of, slice(mine.start, mine.stop), loss_type)
        loss.backward()
        for name, p in sharded.model.named_parameters():
            got = p.grad.full_tensor() if p.grad is not None else None
            if (got is None) != (name not in want) or \
                    got is not None and not torch.allclose(got, want[name], rtol=1e-4, atol=1e-6):
                bad.append(f"{loss_type} {name}")
        total = world.sum(loss.detach().clone())
        whole_loss = whole(loss_of, slice(0, B), loss_type).detach()
        if not torch.allclose(total, whole_loss, rtol=1e-5, atol=1e-7):
            bad.append(f"{loss_type} loss {total.item()} != {whole_loss.item()}")
    if world.is_main:
        print("mismatches:", bad if bad else "none", flush=True)
    dist.destroy_process_group()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
