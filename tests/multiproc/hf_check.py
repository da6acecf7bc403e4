"""Hugging Face DeepSeek-V3 on DWDP across ranks (run by tests/test_gpu_transformers.py through dwdp_ops.launch).

    hf_check.py POLICY       POLICY: prefetch_all or on_demand

Every rank builds the same small random ``DeepseekV3ForCausalLM`` (64 routed experts, top-4 of 8 groups, 3 layers of
which 2 MoE, real head structure) in bf16 on its GPU, runs it (greedy generate, logits)
through the ``dwdp`` experts path over its own full expert tensors (the all-local reference), then turns it into
DWDP (``DwdpDeepseekV3``: its slice of the experts in an ExpertStore, the rest fetched) and runs the same prompt:
identical greedy tokens and logits equal to the last bit, on every rank.
"""

import sys

import dwdp_ops
import torch
import transformers
from dwdp_ops.integrations.transformers import DwdpDeepseekV3, moe_layers


class AllLocal:
    """A scheduler stand-in: every expert is already on this GPU."""

    step_policy = "prefetch_all"

    def begin_step(self, tokens):
        return self.step_policy

    def abort(self):
        pass

    def wait(self, p, stream, ids=None):
        pass

    def release(self, p, stream):
        pass


def build(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV3Config(
        vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=8, n_shared_experts=1, n_routed_experts=64,
        routed_scaling_factor=2.5, kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16, v_head_dim=32,
        qk_nope_head_dim=32, n_group=8, topk_group=4, num_experts_per_tok=4, first_k_dense_replace=1,
        max_position_embeddings=256, num_mtp_layers=0)
    m = transformers.DeepseekV3ForCausalLM(cfg).to(torch.bfloat16).cuda().eval()
    with torch.no_grad():
        for _, ex in moe_layers(m):
            ex.gate_up_proj.normal_(0, 0.05)
            ex.down_proj.normal_(0, 0.05)
        for layer in m.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(0, 0.5)
    return m


def main() -> int:
    policy = sys.argv[1]
    with dwdp_ops.init(timeout=300) as rt:
        me = rt.rank()
        torch.cuda.set_device(rt.device)
        ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(me)).cuda()
        model = build(0)
        # the reference: the same 'dwdp' experts path over the model's own full expert tensors on this GPU (no store,
        # no fetch); Hugging Face's eager experts add in bf16 (index_add_), whose rounding can flip near-tie tokens
        views = [(ex.gate_up_proj.data, ex.down_proj.data) for _, ex in moe_layers(model)]
        with DwdpDeepseekV3(model, views=views, scheduler=AllLocal()), torch.no_grad():
            want = model(ids).logits.float()
            want_tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
        with DwdpDeepseekV3(model, policy=policy) as dw, torch.no_grad():
            got = model(ids).logits.float()
            tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
            dw.store.nvshmem.check_errors()
            dwdp_ops.barrier()
        rel = float((got - want).norm() / want.norm())
        ok = rel == 0.0 and torch.equal(tokens, want_tokens)
        print(f"rank {me}: hf {policy}: logits rel err {rel:.2e}, generate tokens equal "
              f"{torch.equal(tokens, want_tokens)}: {'OK' if ok else 'MISMATCH'}", flush=True)
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
