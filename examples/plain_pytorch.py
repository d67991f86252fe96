"""GRPO with mr1fast's fused loss in a hand-written PyTorch loop, around any transformers causal LM.

    python examples/plain_pytorch.py              # a tiny random Qwen2 built here: offline, seconds
    python examples/plain_pytorch.py --model Qwen/Qwen2.5-0.5B-Instruct --steps 50 --lr 1e-6

Each step: sample G completions of every prompt with model.generate; reward each one (a toy
reward: the share of its tokens equal to one target token); group advantages; then `--updates`
optimizer steps on that rollout (TRL's num_iterations, the paper's mu), each on the loss

    mr1fast.grpo_loss(hidden, lm_head.weight, targets, advantages, mask, old_logp, ref_logp, beta)

where hidden is the LM body's last hidden state (the LM head's input; no [B, T, V] logits are
built), old_logp the policy's log-probs at sampling time and ref_logp those of a frozen copy of
the initial model, with beta from the GRPO-D schedule. Simplifications: text-only, one batch of
prompts reused every step, no gradient accumulation. The model's logits must be exactly
lm_head(hidden) / temperature (no logit soft-capping or scaling). With --steps 20 the tiny
model's reward rises from 0.01 to about 0.9 (10 s on 2 CPU cores).
"""
import argparse
import copy

import torch

import mr1fast
import mr1fast.rollout  # noqa: F401  (first: lets a CUDA-only torchvision import on CPU torch)
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

PROMPTS = ["Say yes or no:", "Is the sky blue? Answer:", "Reply with one word:", "Agree?"]

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--model", default=None,
                    help="a transformers causal LM (default: a tiny random one)")
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--group-size", type=int, default=8, help="G completions per prompt")
parser.add_argument("--max-new-tokens", type=int, default=16)
parser.add_argument("--updates", type=int, default=2, help="optimizer steps per rollout (mu)")
parser.add_argument("--lr", type=float, default=3e-3)
parser.add_argument("--beta-min", type=float, default=0.04)
parser.add_argument("--beta-max", type=float, default=0.1)
parser.add_argument("--target", default=" yes", help="the rewarded token (its first token id)")
parser.add_argument("--impl", default="auto", help="mr1fast impl: auto, triton, torch, naive")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

# Setup: the policy, its frozen reference copy, the prompts and the rewarded token id.
torch.manual_seed(args.seed)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if args.model is None:  # tiny and random: shows the mechanics, and the reward still rises
    config = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).to(device)
    prompt_ids = torch.randint(1, 64, (len(PROMPTS), 6), device=device)
    prompt_mask, target_id, eos_id, pad_id = torch.ones_like(prompt_ids), 7, None, 0
else:
    tok = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to(device)
    enc = tok(PROMPTS, return_tensors="pt", padding=True).to(device)
    prompt_ids, prompt_mask = enc.input_ids, enc.attention_mask
    target_id = tok(args.target, add_special_tokens=False).input_ids[0]
    eos_id, pad_id = tok.eos_token_id, tok.pad_token_id
ref_model = copy.deepcopy(model).eval().requires_grad_(False)
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
G, P = args.group_size, prompt_ids.shape[1]


def hidden_and_head(m, seq, attn):
    """The LM body's last hidden state [B, T, d] of seq (the head's input) and the head."""
    positions = (attn.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded prompts
    hidden = m.get_decoder()(input_ids=seq, attention_mask=attn,
                             position_ids=positions).last_hidden_state
    return hidden, m.get_output_embeddings()


def completion_logp(m, seq, attn, completion):
    """log p(completion tokens) [B, L] under m, without logits (mr1fast.token_logprobs)."""
    hidden, head = hidden_and_head(m, seq, attn)
    return mr1fast.token_logprobs(hidden[:, P - 1:-1], head.weight, completion, bias=head.bias,
                                  impl=args.impl)


for step in range(args.steps):
    # Rollout: G samples per prompt from the policy's own distribution (temperature 1, no top-k),
    # so that the sampler's log-probs are the policy's, and old_logp below is exact.
    model.eval()
    with torch.no_grad():
        seq = model.generate(prompt_ids, attention_mask=prompt_mask, do_sample=True, top_k=0,
                             top_p=1.0, temperature=1.0, max_new_tokens=args.max_new_tokens,
                             num_return_sequences=G, eos_token_id=eos_id, pad_token_id=pad_id)
    completion = seq[:, P:]  # [B, L], B = prompts * G, each prompt's G samples contiguous
    mask = torch.ones_like(completion, dtype=torch.float32)  # up to and including the first EOS
    if eos_id is not None:
        is_eos = (completion == eos_id).int()
        mask = (is_eos.cumsum(1) - is_eos == 0).float()
    attn = torch.cat([prompt_mask.repeat_interleave(G, 0), mask.long()], 1)
    rewards = ((completion == target_id) * mask).sum(1) / mask.sum(1).clamp(min=1)
    advantages = mr1fast.group_advantages(rewards, G)       # [B] fp32
    with torch.no_grad():
        old_logp = completion_logp(model, seq, attn, completion)
        ref_logp = completion_logp(ref_model, seq, attn, completion)
    beta = mr1fast.grpo_d_beta(step, args.steps, args.beta_min, args.beta_max)

    model.train()
    for _ in range(args.updates):
        hidden, head = hidden_and_head(model, seq, attn)
        # hidden at position t predicts token t + 1: completion token j (position P + j) is
        # scored by the hidden state at position P + j - 1.
        loss, stats = mr1fast.grpo_loss(hidden[:, P - 1:-1], head.weight, completion, advantages,
                                        mask=mask, old_logp=old_logp, ref_logp=ref_logp,
                                        beta=beta, bias=head.bias, impl=args.impl)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    print(f"step {step + 1}/{args.steps}  loss {loss.item():.5f}  "
          f"reward {rewards.mean().item():.4f}  beta {beta:.4f}  kl {stats['kl'].item():.5f}  "
          f"clip_frac {stats['clip_frac'].item():.3f}", flush=True)
