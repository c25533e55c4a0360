"""bench/profile_summary.py reads real jax.profiler traces."""
import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "bench"))
import profile_summary  # noqa: E402  pylint: disable=g-import-not-at-top

sys.path.pop(0)


def test_summarises_a_recorded_trace(tmp_path):
  f = jax.jit(lambda a: jnp.tanh(a @ a) @ a)
  a = jnp.ones((256, 256))
  f(a).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(3):
      f(a).block_until_ready()
  summary = profile_summary.summarize(tmp_path, host=True)
  assert summary["busy_us"] > 0 and summary["span_us"] > 0
  total = sum(d for _, d in summary["classes"])
  assert total == pytest.approx(summary["busy_us"])
  names = [n for n, _, _ in summary["kernels"]]
  assert any("PjitFunction" in n for n in names), names[:10]
  text = profile_summary.render(summary, top=5)
  assert "| class | ms | share |" in text
  with pytest.raises(ValueError, match="no device tracks"):
    profile_summary.summarize(tmp_path)  # a CPU run has no /device tracks


def test_missing_trace_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="trace.json.gz"):
    profile_summary.newest_trace(tmp_path)


@pytest.mark.parametrize("name,label", [
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", "matmul library"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", "matmul library"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "attention (cuDNN/flash)"),
    ("local_attention_fwd", "pallas/triton kernel"),
    ("selective_scan_bwd", "pallas/triton kernel"),
    ("loop_multiply_fusion_3", "xla fusion"),
    ("input_reduce_fusion", "xla fusion"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "collective"),
    ("Memcpy DtoD", "copy"),
    ("something_else", "other"),
])
def test_classify(name, label):
  assert profile_summary.classify(name) == label
