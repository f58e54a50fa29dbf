"""The benchmark harness of pldr-kernels: `pldr-bench` (`python -m pldr_kernels.bench`). measure,
ops_suite, generate_suite and train_suite measure into JSON; report renders it;
pldr_kernels.testing judges.

Measurements that once had their own scripts (add --json/--markdown/--plot to any):
  prefill vs SDPA (q·G given and q·G + SDPA) and eager; decode vs SDPA on the same cache (CPU):
    pldr-bench ops --ops g_attention g_attention_decode --seqlens 1024 --cache-lens 4096
      --dtypes float32 --contestants pldr_kernels eager 'sdpa_*' --repeats 15
  metric_tensors vs the eager metric learner (CPU):
    pldr-bench ops --ops metric_tensors --seqlens 1024 --dtypes float32 --repeats 20
  the 110M model: prefill (TTFT) and kvg decode per token, fp32 and bf16, vs the fp32 reference:
    pldr-bench generate --prompt-lens 128 --new-tokens 24 --modes kvg
      --gen-dtypes float32 bfloat16 --repeats 7
  CUDA prefill, bf16, each SDPA backend with and without the q·G GEMM:
    pldr-bench ops --device cuda --ops g_attention --batch 1 2 4 8 16
      --seqlens 1024 2048 4096 8192 --dtypes bfloat16 --contestants pldr_kernels 'sdpa_*'
      --repeats 30
  training: g_attention and metric learner fwd+bwd, the 110M model's training step (CPU):
    pldr-bench train --seqlens 1024 --dtypes float32 --repeats 5
  CUDA training, bf16: g_attention fwd+bwd vs each SDPA backend on q·G and eager:
    pldr-bench train --device cuda --train-parts g_attention --seqlens 2048 4096 8192
      --dtypes bfloat16 --repeats 20
  CUDA decode GB/s against the device copy bandwidth, and the metric learner vs eager:
    pldr-bench ops --device cuda --ops g_attention_decode --batch 1 8
      --cache-lens 1024 16384 131072 --dtypes bfloat16 --repeats 50
    pldr-bench ops --device cuda --ops metric_tensors --seqlens 1024
      --dtypes bfloat16 float32 --repeats 50
"""
