// Op schemas of pldr-kernels (docs/design.md §3), the stub module init that lets `import` load
// them, and the ADInplaceOrView / Autograd kernels of the in-place decode ops. Backends register
// their kernels with TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <memory>
#include <type_traits>
#include <utility>

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
  // Weight-streaming linears for a few rows (docs/design.md §3.9): weight fp32, bf16 or int8
  // (with per-row fp32 scales); swiglu_small's weight is SwiGLU's [gate; up] pack.
  m.def("linear_small(Tensor x, Tensor weight, Tensor? bias=None, Tensor? scale=None) -> Tensor");
  m.def("swiglu_small(Tensor x, Tensor weight, Tensor? bias=None, Tensor? scale=None) -> Tensor");
  // One post-LN decoder layer of a CPU decode step (docs/design.md §3.12): projections, RoPE,
  // append + attention with the cached G, dense, residual + LN, SwiGLU FFN, residual + LN.
  m.def(
      "decode_layer(Tensor x, Tensor qkv_weight, Tensor? qkv_bias, Tensor? qkv_scale, "
      "Tensor dense_weight, Tensor? dense_bias, Tensor? dense_scale, Tensor ln1_weight, "
      "Tensor ln1_bias, Tensor ffn_w12, Tensor? ffn_b12, Tensor? ffn_s12, Tensor ffn_w3, "
      "Tensor? ffn_b3, Tensor? ffn_s3, Tensor ln2_weight, Tensor ln2_bias, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? cache_start, Tensor? G, Tensor rope_cos, "
      "Tensor rope_sin, bool interleaved_rope, float eps) -> Tensor");
  // The rows of the LM head's cross entropy (docs/design.md §3.10), fp32 logits [N, V]:
  // lse [N] and nll [N] = lse − logits[i, targets[i]] (0 where targets[i] = ignore_index), and
  // the gradient of Σ grad_nll·nll for the logits' columns [start, end) (+ grad_logits there).
  m.def("cross_entropy_forward(Tensor logits, Tensor targets, int ignore_index=-100) -> "
        "(Tensor lse, Tensor nll)");
  m.def("cross_entropy_backward(Tensor logits, Tensor lse, Tensor targets, Tensor grad_nll, "
        "int start, int end, Tensor? grad_logits=None, int ignore_index=-100) -> Tensor");
  // x.t().contiguous() of a 2-D fp32 tensor, multithreaded (docs/design.md §3.11).
  m.def("transpose_2d(Tensor x) -> Tensor");
}

// ---- autograd of the in-place decode ops (docs/design.md §3.5, §3.12) -------------------------
// g_attention_decode and decode_layer append to k_cache / v_cache in place (the schemas'
// Tensor(a!) / Tensor(b!)). The ADInplaceOrView kernel bumps the version counters of every
// argument the schema marks written, after the call, as torch's own in-place ops do, so a tensor
// saved for backward that the append overwrote fails autograd's version check instead of giving
// a wrong gradient. (torch's autogradNotImplementedInplaceOrViewFallback bumps only mutated
// *returns*; these ops return a new tensor.) The Autograd kernel gives the output a backward that
// raises words saying why: the forward runs, so a generation loop under grad mode still works.
// Caches that require grad are refused by checks.h on every backend. metric_tensors and
// g_attention get their autograd elsewhere (pldr_kernels/autograd). Both kernels are boxed: one
// pair serves every such op, reading what is written from the op's schema.
namespace {

constexpr const char* kDecodeHasNoBackward =
    "pldr::g_attention_decode has no backward: it is the inference-only decode step over a "
    "KV-cache (it appends k_new/v_new to the caches in place). For gradients, attend over the "
    "full sequence with pldr::g_attention (pldr_kernels.g_attention); run decoding under "
    "torch.no_grad() or torch.inference_mode() (docs/design.md §3.5).";

constexpr const char* kDecodeLayerHasNoBackward =
    "pldr::decode_layer has no backward: it is one decoder layer of the inference-only decode "
    "step (it appends the token's k/v to the caches in place). For gradients, run the model's "
    "full-sequence forward (PLDRForCausalLM.forward); run decoding under torch.no_grad() or "
    "torch.inference_mode() (docs/design.md §3.12).";

const char* no_backward_message(const c10::OperatorHandle& op) {
  return op.schema().name() == "pldr::decode_layer" ? kDecodeLayerHasNoBackward
                                                    : kDecodeHasNoBackward;
}

bool is_written(const c10::Argument& argument) {
  return argument.alias_info() != nullptr && argument.alias_info()->isWrite();
}

// The op's arguments on the stack (the last `n` entries) that are tensors, written or not.
std::vector<at::Tensor> tensor_arguments(const c10::OperatorHandle& op,
                                         const torch::jit::Stack& stack, bool written) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack.size() - arguments.size();
  std::vector<at::Tensor> tensors;
  for (size_t i = 0; i < arguments.size(); ++i) {
    const c10::IValue& value = stack[first + i];
    if (value.isTensor() && is_written(arguments[i]) == written) {
      tensors.push_back(value.toTensor());
    }
  }
  return tensors;
}

void bump_written_after_call(const c10::OperatorHandle& op, c10::DispatchKeySet,
                             torch::jit::Stack* stack) {
  const std::vector<at::Tensor> written = tensor_arguments(op, *stack, /*written=*/true);
  {
    at::AutoDispatchBelowADInplaceOrView below;  // next: the backend (or the fake kernel)
    op.callBoxed(stack);
  }
  for (const at::Tensor& t : written) {
    torch::autograd::impl::bump_version(t);  // only after a call that did not raise
  }
}

// Autograd nodes are held by std::shared_ptr in older torch (2.11, the H200 stack) and by
// c10::intrusive_ptr in newer (2.13 here): make one of whichever kind Edge::function is.
template <class NodeType, class... Args>
decltype(torch::autograd::Edge::function) make_node(Args&&... args) {
  using NodePtr = decltype(torch::autograd::Edge::function);
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<NodeType>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<NodeType>(std::forward<Args>(args)...);
  }
}

void forward_without_backward(const c10::OperatorHandle& op, c10::DispatchKeySet,
                              torch::jit::Stack* stack) {
  const std::vector<at::Tensor> inputs = tensor_arguments(op, *stack, /*written=*/false);
  {
    at::AutoDispatchBelowAutograd below;  // next: ADInplaceOrView
    op.callBoxed(stack);
  }
  if (torch::autograd::compute_requires_grad(at::ArrayRef<at::Tensor>(inputs))) {
    at::Tensor out = stack->back().toTensor();
    torch::autograd::set_history(
        out, make_node<torch::autograd::Error>(
                 no_backward_message(op),
                 torch::autograd::collect_next_edges(at::ArrayRef<at::Tensor>(inputs))));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(pldr, ADInplaceOrView, m) {
  for (const char* name : {"g_attention_decode", "decode_layer"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&bump_written_after_call>());
  }
}

TORCH_LIBRARY_IMPL(pldr, Autograd, m) {
  for (const char* name : {"g_attention_decode", "decode_layer"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&forward_without_backward>());
  }
}
