"""Hugging Face ``DeepseekV3ForCausalLM`` (transformers 5.x) with its routed experts on DWDP.

transformers 5 keeps a MoE layer's routed experts as ``gate_up_proj [E, 2I, H]`` (gate rows, then up rows) and
``down_proj [E, H, I]`` on a ``DeepseekV3Experts`` module whose forward dispatches on
``config._experts_implementation`` through ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`` with the
interface ``experts(self, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``. That is our
layout (``ExpertLayout.moe``), so ``DwdpDeepseekV3(model)``:

  1. plans which experts this rank keeps (``plan``: ``ExpertPartition.disjoint`` over the job's ranks, or a given
     partition) and refuses configurations it cannot serve, naming why (not DeepSeek-V3, no MoE layer, experts not
     divisible as asked);
  2. moves this rank's slice of every MoE layer's experts into an ``ExpertStore`` (collective: one process per GPU
     under ``dwdp_ops.launch`` or torchrun) and frees the model's own expert tensors;
  3. registers the experts implementation ``"dwdp"``: before a layer's experts it waits for the layer's prefetch (or
     fetches the routed experts, ``on_demand``), runs the grouped expert MLP over the store's ``[E, ...]``
     composite view (``models.routed`` + ``dwdp::expert_mlp``: no merge copy), then releases the slot so that the
     prefetch of the layer two ahead starts; a forward pre-hook on the decoder stack begins each step
     (``PrefetchScheduler.begin_step``, which prefetches the first two layers: a layer ahead of its use);
  4. leaves everything else of the model as it is (attention, router, shared experts, ``generate``).

Differences from the Hugging Face experts: the combine rounds the router weights to the activation dtype and sums
the k slots in float32 by a batched GEMM (HF: float32 products, summed in float32, then cast); tokens agree, logits
to bf16 rounding. Hugging Face's router in 5.17 masks the dropped groups with ``-inf`` like the official gate (older
reports of ``0.0`` are about earlier releases; ``tests/test_transformers_integration.py`` checks it).

Limits: each rank first holds the whole Hugging Face model on its GPU, and the store is built while its experts are
still there (peak: the model plus the store), so this serves models that fit one GPU; the full 671B R1 needs a loader
that reads only the rank's slice. Not yet: DEP (``dispatch``) through this integration; fp8 checkpoints (load them
with ``dequantize=True``: bf16 experts only; other dtypes are refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._checks import is_int
from ..errors import DwdpError
from ..partition import ExpertPartition

EXPERTS_IMPLEMENTATION = "dwdp"

__all__ = ["EXPERTS_IMPLEMENTATION", "DwdpDeepseekV3", "ExpertPlan", "moe_layers", "plan"]


@dataclass(frozen=True)
class ExpertPlan:
    """``layers``: decoder-layer indices with routed experts (MoE position p is ``layers[p]``); ``partition``: the
    expert placement; ``rank``'s experts are ``[lo, hi)``; the expert shapes ``hidden``, ``inter``; ``top_k``."""

    layers: tuple[int, ...]
    partition: ExpertPartition
    rank: int
    lo: int
    hi: int
    hidden: int
    inter: int
    top_k: int


def _text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


def moe_layers(model: Any) -> list[tuple[int, Any]]:
    """``(decoder layer index, its DeepseekV3Experts module)`` of every MoE layer of ``model``."""
    decoder = getattr(getattr(model, "model", model), "layers", None)
    if decoder is None:
        raise DwdpError(f"{type(model).__name__} has no decoder layers at model.model.layers")
    out = []
    for i, layer in enumerate(decoder):
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        if experts is not None and hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj"):
            out.append((i, experts))
    return out


def plan(model_or_config: Any, world: int, rank: int, partition: ExpertPartition | None = None,
         layers: list[int] | None = None) -> ExpertPlan:
    """Which experts rank ``rank`` of ``world`` keeps, for a ``DeepseekV3ForCausalLM`` (or its config with
    ``layers``, the MoE layer indices: strictly increasing ints in ``[first_k_dense_replace, num_hidden_layers)``).
    Pure; raises ValueError naming what is unsupported (the config's ``n_routed_experts``, ``hidden_size`` and
    ``moe_intermediate_size`` must be ints >= 1), TypeError for a ``partition`` that is not an ``ExpertPartition``."""
    config = getattr(model_or_config, "config", model_or_config)
    cfg = _text_config(config)
    if getattr(cfg, "model_type", None) not in ("deepseek_v3", "kimi_k2"):
        raise ValueError(f"DWDP experts need a DeepSeek-V3 model (model_type 'deepseek_v3'), got "
                         f"{getattr(cfg, 'model_type', type(config).__name__)!r}")
    if layers is None:
        if not hasattr(model_or_config, "config"):
            raise ValueError("plan(config, ...) needs layers=[the MoE layer indices]; or pass the model")
        layers = [i for i, _ in moe_layers(model_or_config)]
    layers = list(layers)
    n_layers = getattr(cfg, "num_hidden_layers", None)
    bound = f"in [0, {n_layers}) (num_hidden_layers)" if is_int(n_layers) else ">= 0"
    for j, i in enumerate(layers):
        if not is_int(i) or i < 0 or (is_int(n_layers) and i >= n_layers) or (j and i <= layers[j - 1]):
            raise ValueError(f"layers must be strictly increasing decoder-layer indices (ints) {bound}, got {i!r} "
                             f"({type(i).__name__}) at position {j} of {layers}")
    dense = getattr(cfg, "first_k_dense_replace", None)
    if is_int(dense) and layers and layers[0] < dense:  # DeepseekV3DecoderLayer: MoE iff layer_idx >= it
        raise ValueError(f"layers must be MoE layers: decoder layer {layers[0]} of {layers} is dense "
                         f"(first_k_dense_replace = {dense}: layers 0 to {dense - 1} have a dense MLP, no experts)")
    if not layers:
        raise ValueError("this DeepSeek-V3 configuration has no MoE layer (first_k_dense_replace >= "
                         f"num_hidden_layers = {getattr(cfg, 'num_hidden_layers', '?')}): nothing to distribute")
    e_name = "n_routed_experts" if getattr(cfg, "n_routed_experts", None) or not hasattr(cfg, "num_local_experts") \
        else "num_local_experts"
    # (int() had truncated a float size and parsed a string; a missing one failed with AttributeError at the end)
    E, hidden, inter = (_config_size(cfg, n) for n in (e_name, "hidden_size", "moe_intermediate_size"))
    if not is_int(world) or world < 1 or not is_int(rank) or not 0 <= rank < world:
        raise ValueError(f"world must be >= 1 and rank in [0, world), got world {world!r}, rank {rank!r}")
    world = int(world)
    if partition is not None and not isinstance(partition, ExpertPartition):
        raise TypeError(f"partition must be a dwdp_ops.ExpertPartition or None, got {type(partition).__name__}")
    if partition is None:
        if E % world:
            raise ValueError(f"{E} routed experts do not split evenly over {world} ranks; pass a partition "
                             f"(dwdp_ops.ExpertPartition(E, N, experts_per_rank, stride)) that covers them")
        partition = ExpertPartition.disjoint(E, world)
    if partition.num_experts != E or partition.world_size != world:
        raise ValueError(f"the partition is for {partition.num_experts} experts over {partition.world_size} ranks; "
                         f"the model has {E} experts and the job {world} ranks")
    top_k = getattr(cfg, "num_experts_per_tok", None)
    if not is_int(top_k) or not 1 <= top_k <= E:  # HF's router fails only at the first forward (torch.topk)
        raise ValueError(f"num_experts_per_tok must be an int in [1, {E}] (n_routed_experts), got {top_k!r}")
    lo, hi = partition.local_range(rank)
    return ExpertPlan(tuple(int(i) for i in layers), partition, rank, lo, hi, hidden, inter, int(top_k))


def _config_size(cfg: Any, name: str) -> int:
    """``cfg.name`` as an int >= 1, else a ValueError naming the field (missing: None)."""
    v = getattr(cfg, name, None)
    if not is_int(v) or v < 1:
        raise ValueError(f"config.{name} must be an int >= 1, got {v!r}")
    return int(v)


def dwdp_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The ``"dwdp"`` experts implementation (``ALL_EXPERTS_FUNCTIONS``): ``hidden_states [T, H]``, ``top_k_index
    [T, k]``, ``top_k_weights [T, k]`` -> ``[T, H]`` in ``hidden_states``'s dtype."""
    owner, p = getattr(self, "_dwdp", (None, None))
    if owner is None:
        raise DwdpError("the 'dwdp' experts implementation is set on a layer DwdpDeepseekV3 did not prepare")
    return owner.experts(p, hidden_states, top_k_index, top_k_weights)


def register() -> None:
    """Registers ``"dwdp"`` in transformers' experts interface (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, dwdp_experts_forward)


class DwdpDeepseekV3:
    """DWDP for a loaded ``DeepseekV3ForCausalLM`` (module docstring). Collective construction and ``close()``.

    Args:
        model: the Hugging Face model, on this rank's GPU, bf16.
        policy: ``prefetch_all``, ``on_demand`` or ``auto`` (``PrefetchScheduler``).
        partition: the expert placement (default: disjoint over the job's ranks).
        views: for tests without a GPU only: per MoE position ``(w13, w2)`` tensors standing in for the store's
            composite views, with ``scheduler`` a stand-in (no store is built, no expert tensor is freed); a
            ``scheduler`` without ``views`` is refused.
        rates: the measured rates ``auto`` decides with (a ``dwdp_ops.policy.Rates``; None: H200 figures).

    Raises:
        ValueError / TypeError: an unsupported model, policy, partition or ``rates``, before anything is built (a
            model whose experts a live ``DwdpDeepseekV3`` serves, or whose expert tensors are not the config's
            ``[E, 2I, H]`` / ``[E, H, I]``, freed by an earlier one, is unsupported).
            A failure after the experts moved into the store (the scheduler's construction, say) closes the store
            (collective, as its construction), removes what was installed on the model and re-raises; the model's
            expert tensors stay freed (the store held only this rank's slice, so they cannot be restored from it):
            reload the model.
    """

    def __init__(self, model: Any, *, policy: str = "prefetch_all", partition: ExpertPartition | None = None,
                 views: list | None = None, scheduler: Any = None, rates: Any = None):
        self.model = model
        self._hooks: list[Any] = []
        self._closed = False
        self.store = None
        if views is None:
            from ..runtime import get_runtime

            rt = get_runtime()
            rt.require("DwdpDeepseekV3")
            self.plan = plan(model, rt.world_size(), rt.rank(), partition)
        else:
            self.plan = plan(model, 1, 0, partition)
        layers = dict(moe_layers(model))
        self._experts = [layers[i] for i in self.plan.layers]
        import torch

        pl = self.plan
        for i, ex in zip(pl.layers, self._experts):
            if hasattr(ex, "_dwdp"):  # (a second wrapper had taken the layers over from a live one)
                raise ValueError(f"decoder layer {i}'s experts are already served by a DwdpDeepseekV3; close() it "
                                 f"first")
            if hasattr(ex, "gate_up_proj_scale_inv") or ex.gate_up_proj.dtype != torch.bfloat16:
                raise ValueError(f"DwdpDeepseekV3 serves bf16 experts; this model's are {ex.gate_up_proj.dtype}"
                                 + (" with block scales (an fp8 checkpoint: load it with dequantize=True)"
                                    if hasattr(ex, "gate_up_proj_scale_inv") else " (cast the model to bfloat16)"))
            E = pl.partition.num_experts
            for name, want in (("gate_up_proj", (E, 2 * pl.inter, pl.hidden)), ("down_proj", (E, pl.hidden, pl.inter))):
                got = tuple(getattr(ex, name).shape)
                if got != want:  # (freed ones had reached the collective store construction and failed in load)
                    raise ValueError(f"decoder layer {i}'s experts.{name} must be {list(want)} (the config's "
                                     f"[E, 2I, H] / [E, H, I]), got {list(got)}: experts a DwdpDeepseekV3 moved into "
                                     f"its store are freed from the model (reload it)")
        if policy not in ("prefetch_all", "on_demand", "auto"):
            raise ValueError(f"policy must be 'prefetch_all', 'on_demand' or 'auto' (DEP through this integration "
                             f"is not supported yet), got {policy!r}")
        # everything that can be checked or imported before _build_store frees the model's experts
        from ..policy import Rates
        from ..scheduler import PrefetchScheduler

        if rates is not None and not isinstance(rates, Rates):
            raise TypeError(f"rates must be a dwdp_ops.policy.Rates, got {type(rates).__name__}")
        if views is not None and (scheduler is None or len(views) != len(self._experts)):
            raise ValueError("views (one (w13, w2) per MoE layer) come with a stand-in scheduler")
        if views is None and scheduler is not None:  # (had been ignored: the store path builds its own)
            raise ValueError("scheduler (a stand-in) comes with views; without them DwdpDeepseekV3 builds its "
                             "PrefetchScheduler from policy and rates")
        register()  # (idempotent; imports transformers' experts interface)
        cfg = _text_config(model.config)
        self._previous = getattr(cfg, "_experts_implementation", None)
        if views is None:
            self.store, self.views = self._build_store()  # frees the model's expert tensors
        else:
            self.views = list(views)
        try:
            self.sched = (PrefetchScheduler(self.store, policy=policy, top_k=self.plan.top_k, rates=rates)
                          if views is None else scheduler)
            for p, ex in enumerate(self._experts):
                ex._dwdp = (self, p)
            cfg._experts_implementation = EXPERTS_IMPLEMENTATION
            decoder = getattr(model, "model", model)
            self._hooks.append(decoder.register_forward_pre_hook(self._begin_step, with_kwargs=True))
        except BaseException:
            for ex in self._experts:
                if getattr(ex, "_dwdp", (None,))[0] is self:
                    del ex._dwdp
            self.close()  # hooks, the experts implementation's name, the store
            raise

    # -- construction ------------------------------------------------------------------------------------------------
    def _build_store(self):
        """Moves this rank's experts into an ExpertStore (collective) and frees the model's expert tensors."""
        import torch

        from ..layout import ExpertLayout
        from ..models.deepseek_r1.gpu import _torch_view
        from ..models.deepseek_r1.serve import layout_dtype, torch_to_cupy
        from ..runtime import get_runtime
        from ..store import ExpertStore

        pl = self.plan
        dtype = self._experts[0].gate_up_proj.dtype
        store = ExpertStore(pl.partition, ExpertLayout.moe(pl.hidden, pl.inter, layout_dtype(dtype)), len(pl.layers))
        try:
            for p, ex in enumerate(self._experts):
                with torch.no_grad():
                    store.load(p, "w13", torch_to_cupy(ex.gate_up_proj.data[pl.lo:pl.hi].contiguous()))
                    store.load(p, "w2", torch_to_cupy(ex.down_proj.data[pl.lo:pl.hi].contiguous()))
                torch.cuda.synchronize()
                empty = torch.empty(0, dtype=dtype, device=ex.gate_up_proj.device)
                ex.gate_up_proj = torch.nn.Parameter(empty, requires_grad=False)  # the store holds them now
                ex.down_proj = torch.nn.Parameter(empty.clone(), requires_grad=False)
            torch.cuda.empty_cache()  # the freed experts back to the driver (PyTorch's cache would keep them)
            get_runtime().barrier()  # every rank's experts are loaded before any peer fetches them
            views = [tuple(_torch_view(store.composite(p, n), dtype) for n in ("w13", "w2"))
                     for p in range(len(pl.layers))]
        except BaseException:
            store.close()
            raise
        return store, views

    # -- the step ----------------------------------------------------------------------------------------------------
    def _begin_step(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        if ids is None and emb is None:  # (had raised AttributeError: 'NoneType' object has no attribute 'shape')
            raise ValueError("DwdpDeepseekV3: the forward needs input_ids or inputs_embeds, got neither")
        tokens = int(ids.numel()) if ids is not None else int(emb.shape[0] * emb.shape[1])
        self.sched.abort()  # a step that raised half-way (or a generate() stopped early) leaves nothing in flight
        self.sched.begin_step(tokens=tokens)

    def experts(self, p: int, hidden_states, top_k_index, top_k_weights):
        """MoE position ``p``'s routed experts for ``hidden_states [T, H]`` (see ``dwdp_experts_forward``)."""
        import torch

        from ..models.routed import routed_experts
        from ..torch import expert_mlp

        home = getattr(self.store, "device", None)
        if home is not None and hidden_states.device != torch.device("cuda", home):
            raise ValueError(f"DwdpDeepseekV3: MoE position {p}'s hidden states are on {hidden_states.device}, the "
                             f"expert store on cuda:{home} (keep the model on the GPU it was on when DWDP was set up)")
        # the stream of the tensors' device, not the current device's (their kernels run there)
        stream = torch.cuda.current_stream(hidden_states.device) if hidden_states.is_cuda else None
        ids = top_k_index.to(torch.int64)
        if self.sched.step_policy == "on_demand":
            self.sched.wait(p, stream, ids=ids.reshape(-1).to(torch.int32).contiguous())
        else:
            self.sched.wait(p, stream)
        w13, w2 = self.views[p]
        out = routed_experts(hidden_states, top_k_weights, ids, lambda xg, offs: expert_mlp(xg, offs, w13, w2),
                             num_experts=self.plan.partition.num_experts)
        self.sched.release(p, stream)
        return out.to(hidden_states.dtype)

    # -- lifetime ----------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Removes the hooks, restores the model's experts implementation name and frees the store (collective). The
        model's expert weights are not restored (they were freed): the model is unusable without DWDP after this.
        A second call only retries a store whose ``close()`` raised (it had also restored the name again, under a
        later wrapper or the user's own)."""
        if not self._closed:
            self._closed = True
            for ex in self._experts:  # (the layers had kept pointing at the closed wrapper and its store)
                if getattr(ex, "_dwdp", (None,))[0] is self:
                    del ex._dwdp
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
            cfg = _text_config(self.model.config)
            cfg._experts_implementation = self._previous
        if self.store is not None:
            self.store.close()
            self.store = None

    def __enter__(self) -> DwdpDeepseekV3:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
