// Schemas of every dpkernels op, their Meta kernels (shape/dtype only, so FakeTensor and
// torch.compile can trace them), and has_backend. The CPU kernels register themselves in
// csrc/cpu/*.cpp and the CUDA kernels in csrc/cuda/*.cu, each with TORCH_LIBRARY_IMPL.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "dpkernels/checks.h"

#ifdef DPKERNELS_PYTHON_MODULE
#include <Python.h>
// `import dpkernels._C` only has to load this library: loading runs the registrations.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "dpkernels compiled ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

namespace dpkernels {
namespace {

using Pair = std::tuple<at::Tensor, at::Tensor>;

at::TensorOptions acc_options(const at::Tensor& like) {
  return like.options().dtype(acc_type(like.scalar_type()));
}

Pair linear_norm_meta(const at::Tensor& A, const at::Tensor& G, bool with_bias) {
  TORCH_CHECK(A.dim() >= 2 && G.dim() == A.dim(), "dpkernels: A and G must be [B, d] / [B, T, d] of equal rank");
  auto opts = acc_options(A);
  at::Tensor w = at::empty_symint({A.sym_size(0)}, opts);
  at::Tensor b = with_bias ? at::empty_symint({A.sym_size(0)}, opts) : at::empty({0}, opts);
  return {w, b};
}

Pair clipped_sum_meta(const at::Tensor& A, const at::Tensor& G, const at::Tensor& c,
                      const std::optional<at::Tensor>& c_bias, double, int64_t, int64_t) {
  TORCH_CHECK(A.dim() >= 2 && G.dim() == A.dim(), "dpkernels.clipped_sum: A and G must be of equal rank >= 2");
  auto opts = acc_options(A);
  at::Tensor w = at::empty_symint({G.sym_size(-1), A.sym_size(-1)}, opts);
  at::Tensor b = c_bias.has_value() ? at::empty_symint({G.sym_size(-1)}, opts) : at::empty({0}, opts);
  return {w, b};
}

at::Tensor sq_norms_meta(const at::Tensor& X) {
  TORCH_CHECK(X.dim() >= 1, "dpkernels.sq_norms: X must be [B, ...]");
  return at::empty_symint({X.sym_size(0)}, acc_options(X));
}

at::Tensor clipped_rows_sum_meta(const at::Tensor& X, const at::Tensor&, double, int64_t, int64_t) {
  TORCH_CHECK(X.dim() >= 1, "dpkernels.clipped_rows_sum: X must be [B, ...]");
  return at::empty_symint(X.sym_sizes().slice(1), acc_options(X));
}

at::Tensor affine_grad_sample_meta(const at::Tensor& xhat, const at::Tensor& G) {
  TORCH_CHECK(xhat.dim() >= 2, "dpkernels.affine_grad_sample: xhat must be [B, C, S]");
  auto sizes = xhat.sym_sizes();
  return at::empty_symint(sizes.slice(0, sizes.size() - 1), acc_options(G));
}

at::Tensor embedding_norm_meta(const at::Tensor& ids, const at::Tensor& G) {
  TORCH_CHECK(ids.dim() >= 1, "dpkernels.embedding_norm: ids must be [B, T]");
  return at::empty_symint({ids.sym_size(0)}, acc_options(G));
}

at::Tensor embedding_clipped_sum_meta(const at::Tensor&, const at::Tensor& G, const at::Tensor&,
                                      int64_t num_embeddings, double, int64_t, int64_t) {
  return at::empty_symint({c10::SymInt(num_embeddings), G.sym_size(-1)}, acc_options(G));
}

at::Tensor add_noise_meta(at::Tensor x, double, int64_t, int64_t) { return x; }

bool has_backend(std::string device_type) {
  if (device_type == "cpu") return true;
#ifdef DPKERNELS_WITH_CUDA
  if (device_type == "cuda") return true;
#endif
  return false;
}

}  // namespace

TORCH_LIBRARY(dpkernels, m) {
  m.def("ghost_norm(Tensor A, Tensor G, bool with_bias) -> (Tensor, Tensor)");
  m.def("direct_norm(Tensor A, Tensor G, bool with_bias) -> (Tensor, Tensor)");
  m.def(
      "clipped_sum(Tensor A, Tensor G, Tensor c, Tensor? c_bias, float noise_std, int seed, int offset)"
      " -> (Tensor, Tensor)");
  m.def("sq_norms(Tensor X) -> Tensor");
  m.def("clipped_rows_sum(Tensor X, Tensor c, float noise_std, int seed, int offset) -> Tensor");
  m.def("affine_grad_sample(Tensor xhat, Tensor G) -> Tensor");
  m.def("embedding_norm(Tensor ids, Tensor G) -> Tensor");
  m.def(
      "embedding_clipped_sum(Tensor ids, Tensor G, Tensor c, int num_embeddings, float noise_std, int seed,"
      " int offset) -> Tensor");
  m.def("add_noise_(Tensor(a!) x, float std, int seed, int offset) -> Tensor(a!)");
  m.def("has_backend(str device_type) -> bool", &has_backend);
}

TORCH_LIBRARY_IMPL(dpkernels, Meta, m) {
  m.impl("ghost_norm", TORCH_FN(linear_norm_meta));
  m.impl("direct_norm", TORCH_FN(linear_norm_meta));
  m.impl("clipped_sum", TORCH_FN(clipped_sum_meta));
  m.impl("sq_norms", TORCH_FN(sq_norms_meta));
  m.impl("clipped_rows_sum", TORCH_FN(clipped_rows_sum_meta));
  m.impl("affine_grad_sample", TORCH_FN(affine_grad_sample_meta));
  m.impl("embedding_norm", TORCH_FN(embedding_norm_meta));
  m.impl("embedding_clipped_sum", TORCH_FN(embedding_clipped_sum_meta));
  m.impl("add_noise_", TORCH_FN(add_noise_meta));
}

}  // namespace dpkernels
