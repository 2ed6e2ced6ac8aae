"""FLOPs per network call, counted once at build time and stored in the manifest.

torch's ``FlopCounterMode`` counts the matrix products and convolutions of one
forward pass (2 FLOPs per multiply-add; elementwise work is not counted, as in
every published diffusion FLOP figure). The pass runs on fake tensors, so it
costs neither time nor memory even for the SD2 UNet, and attention is forced
onto the math path so its two matrix products are counted like any others.

The manifest keeps one point per shape the runtime runs most: the opt shape of
every profile, at batch 2 (guided) and batch 1 (unguided).
"""

from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from seesr_runtime.networks import NetworkSpec

from .export import sample_feeds

METHOD = "torch.utils.flop_counter.FlopCounterMode on fake tensors (matmul/conv only, 2 per MAC)"


def flop_envs(spec: NetworkSpec) -> list[dict]:
    """The named-dimension values to count at: every profile's opt shape, and its batch-1 twin."""
    envs = []
    for profile in spec.profiles:
        for batch in sorted({profile.min.get("B", 1), profile.opt.get("B", 1)}):
            env = {**profile.opt, "B": batch}
            if env not in envs:
                envs.append(env)
    return envs


def count_flops(module: nn.Module, spec: NetworkSpec, env: dict[str, int]) -> int:
    feeds = sample_feeds(spec, env)
    with FakeTensorMode(allow_non_fake_inputs=True) as fake, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        args = [fake.from_tensor(torch.from_numpy(feeds[name])) for name in spec.input_names]
        with FlopCounterMode(display=False) as counter:
            module.eval()(*args)
    return int(counter.get_total_flops())


def network_flops(module: nn.Module, spec: NetworkSpec) -> dict:
    """The manifest's ``flops`` entry of one network."""
    return {
        "method": METHOD,
        "points": [{"env": env, "flops": count_flops(module, spec, env)} for env in flop_envs(spec)],
    }
