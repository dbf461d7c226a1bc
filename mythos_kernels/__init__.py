"""mythos_kernels: Triton kernels for the OpenMythos recurrent-depth transformer, each beside its
plain-torch reference, behind one dispatch point (:mod:`mythos_kernels._dispatch`)."""

from . import cpu  # noqa: F401  (importing it registers the CPU forms with the dispatch point)
from ._dispatch import (
                        BACKENDS,
                        BackendUnavailable,
                        cpu_variant,
                        cpu_variants,
                        dispatch_counts,
                        get_backend,
                        interpreter_active,
                        reset_cpu_variants,
                        reset_dispatch_counts,
                        set_backend,
                        set_cpu_variant,
                        triton_available,
                        use_backend,
)
from ._env import check_environment
from ._registry import KernelConfig, register_kernel, registered_kernels
from ._scratch import release_scratch, scratch_bytes
from .attention import attention, attention_reference, causal_mask
from .cpu.linear import (
    clear_weight_copies,
    compiled_split,
    decode_head_weight,
    lm_head_transposed,
    packable,
    scope_memo,
    shared_swiglu_packed,
    two_threads,
    weight_copies_enabled,
    weights_unchanged,
)
from .linear import dense, dense_reference, lm_head, lm_head_reference
from .grad_sink import GradSink, sink_embedding
from .linear_ce import linear_cross_entropy, linear_cross_entropy_reference
from .mla import mla_decompress, mla_decompress_reference
from .mla_decode import mla_decode, mla_decode_attention, mla_decode_attention_reference, mla_decode_reference
from .moe import (
                        expert_counts,
                        moe_align_triton,
                        moe_experts,
                        moe_experts_reference,
                        moe_experts_triton,
                        moe_route,
                        moe_route_reference,
                        moe_route_triton,
)
from .recurrent import (
                        HaltCheck,
                        acc_dtype,
                        all_halted,
                        get_A,
                        loop_embedding_vector,
                        loop_index_embedding,
                        loop_input,
                        loop_input_reference,
                        loop_input_triton,
                        lti_act_step,
                        lti_act_step_and_next_input,
                        lti_act_step_and_next_input_reference,
                        lti_act_step_and_next_input_triton,
                        lti_act_step_reference,
                        lti_act_step_triton,
)
from .rmsnorm import rms_norm, rms_norm_reference
from .rope import apply_rope, apply_rope_reference, precompute_rope_freqs

__all__ = [
    "BACKENDS", "BackendUnavailable", "dispatch_counts", "get_backend", "interpreter_active",
    "reset_dispatch_counts", "set_backend", "triton_available", "use_backend", "check_environment",
    "cpu_variant", "cpu_variants", "reset_cpu_variants", "set_cpu_variant",
    "KernelConfig", "register_kernel", "registered_kernels", "release_scratch", "scratch_bytes",
    "attention", "attention_reference", "causal_mask",
    "clear_weight_copies", "compiled_split", "decode_head_weight", "dense", "dense_reference", "lm_head",
    "lm_head_reference", "lm_head_transposed", "packable", "two_threads",
    "shared_swiglu_packed", "weight_copies_enabled", "weights_unchanged", "scope_memo",
    "GradSink", "sink_embedding", "linear_cross_entropy", "linear_cross_entropy_reference",
    "mla_decompress", "mla_decompress_reference", "mla_decode", "mla_decode_attention",
    "mla_decode_attention_reference", "mla_decode_reference",
    "expert_counts", "moe_experts", "moe_experts_reference", "moe_route", "moe_route_reference",
    "moe_align_triton", "moe_experts_triton",
    "moe_route_triton",
    "acc_dtype", "get_A", "loop_embedding_vector", "loop_index_embedding", "loop_input",
    "loop_input_reference",
    "lti_act_step", "lti_act_step_reference", "HaltCheck", "all_halted", "loop_input_triton",
    "lti_act_step_and_next_input", "lti_act_step_and_next_input_reference",
    "lti_act_step_and_next_input_triton",
    "lti_act_step_triton",
    "rms_norm", "rms_norm_reference",
    "apply_rope", "apply_rope_reference", "precompute_rope_freqs",
]
