// Op schemas of pldr-kernels (docs/design.md §3) and the stub module init that lets `import`
// load them. Backends register their kernels with TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda.
#include <Python.h>
#include <torch/library.h>

// `import pldr_kernels._C` only needs the shared object loaded: the registrations below run as
// static initialisers. No pybind: the ops are reached through torch.ops.pldr.*.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(pldr, m) {
  m.def(
      "metric_tensors(Tensor q, Tensor? q_mask, Tensor ln0_w, Tensor ln0_b, Tensor w1, Tensor b1, "
      "Tensor w2, Tensor b2, Tensor w3, Tensor b3, Tensor lnA_w, Tensor lnA_b, Tensor W, Tensor b, "
      "Tensor pw, Tensor a, Tensor ba, float eps_ln=1e-6, float eps_adj=1e-9) "
      "-> (Tensor A, Tensor A_LM, Tensor G)");
  // The backward of metric_tensors (docs/design.md §3.4): the inputs again (nothing else is saved,
  // everything is recomputed) and the gradients of the three outputs, None meaning zero.
  m.def(
      "metric_tensors_backward(Tensor? grad_A, Tensor? grad_A_LM, Tensor? grad_G, Tensor q, "
      "Tensor? q_mask, Tensor ln0_w, Tensor ln0_b, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
      "Tensor w3, Tensor b3, Tensor lnA_w, Tensor lnA_b, Tensor W, Tensor b, Tensor pw, Tensor a, "
      "Tensor ba, float eps_ln=1e-6, float eps_adj=1e-9) -> (Tensor grad_q, Tensor grad_ln0_w, "
      "Tensor grad_ln0_b, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_b2, "
      "Tensor grad_w3, Tensor grad_b3, Tensor grad_lnA_w, Tensor grad_lnA_b, Tensor grad_W, "
      "Tensor grad_b, Tensor grad_pw, Tensor grad_a, Tensor grad_ba)");
  m.def(
      "g_attention(Tensor q, Tensor k, Tensor v, Tensor? G=None, Tensor? key_mask=None, "
      "bool causal=False, float? scale=None) -> (Tensor out, Tensor lse)");
  m.def(
      "g_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? G, Tensor out, "
      "Tensor lse, Tensor? key_mask, bool causal, float? scale) -> (Tensor dq, Tensor dk, Tensor dv, "
      "Tensor? dG)");
  m.def(
      "g_attention_decode(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, "
      "Tensor? k_new=None, Tensor? v_new=None, Tensor? cache_start=None, Tensor? G=None, "
      "float? scale=None, int num_splits=0) -> Tensor");
}
