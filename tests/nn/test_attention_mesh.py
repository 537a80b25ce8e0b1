"""Attention kernels under a sharded target run per shard (shard_map, specs from its rules), matching XLA."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import REPO

SCRIPT = textwrap.dedent('''
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dar_jax import parallel
    from dar_jax.nn.attention import attention, xla_attention
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    target = parallel.target_for(mesh)       # platform from the mesh's devices, default rules
    assert target.platform == "cpu" and target.sharded
    sh = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    q, k, v = (jax.device_put(jax.random.normal(jax.random.key(i), (4, 33, 4, 32)), sh) for i in range(3))
    fn = lambda q, k, v: attention(q, k, v, mask="prefix_causal", prefix_len=9, implementation="pallas",
                                   target=target)
    out = jax.jit(fn)(q, k, v)
    jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
    ref = xla_attention(q, k, v, mask="prefix_causal", prefix_len=9)
    assert "shard_map" in jaxpr, "the kernel did not run per shard"
    # the specs come from the rules passed in: heads over fsdp instead of tensor
    rules = (("batch", "data"), ("heads", "fsdp"))
    fn2 = lambda q, k, v: attention(q, k, v, mask="causal", implementation="pallas",
                                    target=parallel.target_for(mesh, rules))
    jaxpr2 = str(jax.make_jaxpr(fn2)(q, k, v))
    assert "P('data', None, 'fsdp', None)" in jaxpr2, jaxpr2[:3000]
    np.testing.assert_allclose(jax.jit(fn2)(q, k, v), xla_attention(q, k, v, mask="causal"), atol=1e-5)
    # without a target nothing is sharded: the kernel runs on the whole arrays
    assert "shard_map" not in str(jax.make_jaxpr(
        lambda q, k, v: attention(q, k, v, mask="causal", implementation="pallas"))(q, k, v))
    err = float(np.abs(np.asarray(out) - np.asarray(ref)).max())
    assert err < 1e-5, err
    print("OK", err)
''')


def test_pallas_attention_runs_per_shard_under_mesh():
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
