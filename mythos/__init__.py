"""mythos: fast drop-in implementation of the OpenMythos recurrent-depth transformer.

``from mythos import OpenMythos, MythosConfig`` replaces ``from open_mythos import ...``.
"""

from mythos_kernels import dispatch_counts, get_backend, reset_dispatch_counts, set_backend, use_backend

from .cache import CacheCapacityError, CacheError, LayerCache, MythosCache, cache_bytes_per_token
from .checkpoint import from_open_mythos_state_dict, to_open_mythos_state_dict
from .config import MythosConfig
from .model import (
                            ACTHalting,
                            Expert,
                            GQAttention,
                            LoRAAdapter,
                            LTIInjection,
                            MLAttention,
                            MoEFFN,
                            OpenMythos,
                            RecurrentBlock,
                            RMSNorm,
                            TransformerBlock,
                            apply_rope,
                            loop_index_embedding,
                            precompute_rope_freqs,
)
from .variants import mythos_1b, mythos_1t, mythos_3b, mythos_10b, mythos_50b, mythos_100b, mythos_500b

__version__ = "0.1.0"

__all__ = [
    "MythosConfig", "RMSNorm", "GQAttention", "MLAttention", "Expert", "MoEFFN", "LoRAAdapter",
    "TransformerBlock", "LTIInjection", "ACTHalting", "RecurrentBlock", "OpenMythos",
    "precompute_rope_freqs", "apply_rope", "loop_index_embedding",
    "mythos_1b", "mythos_3b", "mythos_10b", "mythos_50b", "mythos_100b", "mythos_500b", "mythos_1t",
    "MythosCache", "LayerCache", "CacheError", "CacheCapacityError", "cache_bytes_per_token",
    "to_open_mythos_state_dict", "from_open_mythos_state_dict",
    "use_backend", "set_backend", "get_backend", "dispatch_counts", "reset_dispatch_counts",
]
