// Torch glue of the CUDA kernels: input checks, [B, T, n] views, dtype dispatch, allocation,
// launch checks, and the registration of every op of the contract as the CUDA kernel of
// torch.ops.dpkernels.* (schemas and Meta kernels: csrc/ops.cpp; semantics:
// dpkernels/reference.py). The kernel sources never include a torch header, which keeps the
// nvcc build of csrc/cuda fast; this is the one translation unit that does.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "dpkernels/checks.h"
#include "dpkernels/tile_math.h"
#include "launchers.cuh"

namespace dpkernels {
namespace cuda {
namespace {

using Pair = std::tuple<at::Tensor, at::Tensor>;

// ---------------------------------------------------------------------------------------
// Dispatch and pointers.
// ---------------------------------------------------------------------------------------
template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the CUDA storage type of `st` (at::Half -> __half, ...).
template <typename F>
void dispatch_floating(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat: return f(TypeTag<float>{});
    case at::kDouble: return f(TypeTag<double>{});
    case at::kHalf: return f(TypeTag<__half>{});
    case at::kBFloat16: return f(TypeTag<__nv_bfloat16>{});
    default: TORCH_CHECK(false, "dpkernels.", op, ": unsupported dtype ", st);
  }
}

// at::Half / at::BFloat16 share the bit layout of __half / __nv_bfloat16.
template <typename T>
const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

template <typename T>
T* mutable_ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

at::TensorOptions acc_options(const at::Tensor& like) { return like.options().dtype(acc_type(like.scalar_type())); }

// Tensor cores for bf16 need sm_80; older GPUs take the SIMT kernels (same results, slower).
bool has_sm80_tensor_cores(const at::Tensor& x) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
  return major >= 8;
}

// ---------------------------------------------------------------------------------------
// Checks and views.
// ---------------------------------------------------------------------------------------
void check_cuda(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.is_cuda(), "dpkernels.", op, ": ", name, " must be a CUDA tensor, got ", x.device());
}

void check_same_device(const at::Tensor& x, const at::Tensor& y, const char* op) {
  TORCH_CHECK(x.device() == y.device(), "dpkernels.", op, ": tensors on different devices: ", x.device(), " and ",
              y.device());
}

// Clip factors c [B] (float32 or float64), cast once to the accumulation dtype and moved next
// to the data they scale.
at::Tensor clip_factors(const at::Tensor& c, int64_t B, const at::Tensor& like, const char* op, const char* name) {
  check_factors(c, B, name, op);
  return c.to(like.device(), acc_type(like.scalar_type())).contiguous();
}

// A, G of a linear layer as contiguous [B, T, d] / [B, T, p] of one dtype. Mixed dtypes meet
// in A's accumulation dtype, as in the reference.
struct LinearInputs {
  at::Tensor A, G;
  int64_t B, T, d, p;
};

LinearInputs linear_inputs(const at::Tensor& A, const at::Tensor& G, const char* op) {
  const LinearDims dims = check_linear(A, G, op);
  check_cuda(A, op, "A");
  check_cuda(G, op, "G");
  at::Tensor a = A, g = G;
  if (A.scalar_type() != G.scalar_type()) {
    a = A.to(acc_type(A.scalar_type()));
    g = G.to(acc_type(A.scalar_type()));
  }
  return {a.reshape({dims.B, dims.T, dims.d}).contiguous(), g.reshape({dims.B, dims.T, dims.p}).contiguous(),
          dims.B, dims.T, dims.d, dims.p};
}

// [B, ...] -> contiguous [B, n], n = product of the trailing dims (also when B = 0).
at::Tensor as_rows(const at::Tensor& X) {
  int64_t n = 1;
  for (int64_t i = 1; i < X.dim(); ++i) n *= X.size(i);
  return X.reshape({X.size(0), n}).contiguous();
}

// ---------------------------------------------------------------------------------------
// Shared pieces of the linear ops.
// ---------------------------------------------------------------------------------------
at::Tensor row_sq_norms(const at::Tensor& X2) {
  at::Tensor out = at::zeros({X2.size(0)}, acc_options(X2));
  dispatch_floating(X2.scalar_type(), "sq_norms", [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_row_sq_norms<T>(ptr<T>(X2), mutable_ptr<acc_of<T>>(out), X2.size(0), X2.size(1), stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// T = 1 shortcut of both norm strategies: g_b = g a^T has ||g_b||^2 = ||a||^2 ||g||^2.
at::Tensor rank_one_sq_norms(const LinearInputs& in) {
  return row_sq_norms(in.A.reshape({in.B, in.d})) * row_sq_norms(in.G.reshape({in.B, in.p}));
}

at::Tensor bias_sq_norms(const LinearInputs& in) {
  at::Tensor out = at::zeros({in.B}, acc_options(in.G));
  dispatch_floating(in.G.scalar_type(), "bias_sq_norms", [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_bias_sq_norms<T>(ptr<T>(in.G), mutable_ptr<acc_of<T>>(out), in.B, in.T, in.p, stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// Ops of the contract.
// ---------------------------------------------------------------------------------------
Pair ghost_norm(const at::Tensor& A, const at::Tensor& G, bool with_bias) {
  const char* op = "ghost_norm";
  const LinearInputs in = linear_inputs(A, G, op);
  const c10::cuda::CUDAGuard guard(in.A.device());
  // 64-token tiles, upper triangle only: T <= 2^20 keeps the tile count inside gridDim.x.
  TORCH_CHECK(in.T <= (int64_t(1) << 20), "dpkernels.ghost_norm: T = ", in.T, " tokens is too long; use direct_norm");
  at::Tensor w;
  if (in.T == 1) {
    w = rank_one_sq_norms(in);
  } else {
    w = at::zeros({in.B}, acc_options(in.A));
    const bool tc = has_sm80_tensor_cores(in.A);
    dispatch_floating(in.A.scalar_type(), op, [&](auto tag) {
      using T = typename decltype(tag)::type;
      launch_ghost_norm<T>(ptr<T>(in.A), ptr<T>(in.G), mutable_ptr<acc_of<T>>(w), in.B, in.T, in.d, in.p, tc,
                           stream());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor b = with_bias ? bias_sq_norms(in) : at::empty({0}, acc_options(in.A));
  return {w, b};
}

Pair direct_norm(const at::Tensor& A, const at::Tensor& G, bool with_bias) {
  const char* op = "direct_norm";
  const LinearInputs in = linear_inputs(A, G, op);
  const c10::cuda::CUDAGuard guard(in.A.device());
  at::Tensor w;
  if (in.T == 1) {
    w = rank_one_sq_norms(in);
  } else {
    w = at::zeros({in.B}, acc_options(in.A));
    const bool tc = has_sm80_tensor_cores(in.A);
    dispatch_floating(in.A.scalar_type(), op, [&](auto tag) {
      using T = typename decltype(tag)::type;
      launch_direct_norm<T>(ptr<T>(in.A), ptr<T>(in.G), mutable_ptr<acc_of<T>>(w), in.B, in.T, in.d, in.p, tc,
                            stream());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor b = with_bias ? bias_sq_norms(in) : at::empty({0}, acc_options(in.A));
  return {w, b};
}

Pair clipped_sum(const at::Tensor& A, const at::Tensor& G, const at::Tensor& c,
                 const std::optional<at::Tensor>& c_bias, double noise_std, int64_t seed, int64_t offset) {
  const char* op = "clipped_sum";
  const LinearInputs in = linear_inputs(A, G, op);
  check_noise_args(noise_std, seed, offset, op);
  const c10::cuda::CUDAGuard guard(in.A.device());
  const at::Tensor cw = clip_factors(c, in.B, in.A, op, "c");
  at::Tensor w = at::empty({in.p, in.d}, acc_options(in.A));
  const bool tc = has_sm80_tensor_cores(in.A);
  dispatch_floating(in.A.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_clipped_sum<T>(ptr<T>(in.A), ptr<T>(in.G), ptr<acc_of<T>>(cw), mutable_ptr<acc_of<T>>(w), in.B, in.T,
                          in.d, in.p, noise_std, uint64_t(seed), uint64_t(offset), tc, stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!c_bias.has_value()) return {w, at::empty({0}, w.options())};
  const at::Tensor cb = clip_factors(*c_bias, in.B, in.A, op, "c_bias");
  at::Tensor b = at::empty({in.p}, w.options());
  const int64_t bias_offset = tile::bias_noise_offset(offset, in.p, in.d);
  dispatch_floating(in.G.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_clipped_bias_sum<T>(ptr<T>(in.G), ptr<acc_of<T>>(cb), mutable_ptr<acc_of<T>>(b), in.B, in.T, in.p,
                               noise_std, uint64_t(seed), uint64_t(bias_offset), stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {w, b};
}

at::Tensor sq_norms(const at::Tensor& X) {
  const char* op = "sq_norms";
  check_cuda(X, op, "X");
  check_floating(X, "X", op);
  TORCH_CHECK(X.dim() >= 1, "dpkernels.sq_norms: X must be [B, ...], got a 0-d tensor");
  const c10::cuda::CUDAGuard guard(X.device());
  return row_sq_norms(as_rows(X));
}

at::Tensor clipped_rows_sum(const at::Tensor& X, const at::Tensor& c, double noise_std, int64_t seed,
                            int64_t offset) {
  const char* op = "clipped_rows_sum";
  check_cuda(X, op, "X");
  check_floating(X, "X", op);
  check_noise_args(noise_std, seed, offset, op);
  TORCH_CHECK(X.dim() >= 1, "dpkernels.clipped_rows_sum: X must be [B, ...], got a 0-d tensor");
  const c10::cuda::CUDAGuard guard(X.device());
  const at::Tensor X2 = as_rows(X);
  const at::Tensor cw = clip_factors(c, X2.size(0), X2, op, "c");
  at::Tensor out = at::empty({X2.size(1)}, acc_options(X2));
  dispatch_floating(X2.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_clipped_rows_sum<T>(ptr<T>(X2), ptr<acc_of<T>>(cw), mutable_ptr<acc_of<T>>(out), X2.size(0), X2.size(1),
                               noise_std, uint64_t(seed), uint64_t(offset), stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out.reshape(X.sizes().slice(1));
}

at::Tensor affine_grad_sample(const at::Tensor& xhat, const at::Tensor& G) {
  const char* op = "affine_grad_sample";
  check_cuda(xhat, op, "xhat");
  check_cuda(G, op, "G");
  check_floating(xhat, "xhat", op);
  check_floating(G, "G", op);
  check_same_device(xhat, G, op);
  TORCH_CHECK(G.dim() >= 1 && xhat.sizes() == G.sizes(),
              "dpkernels.affine_grad_sample: xhat and G must be [B, C, S] of the same shape, got ", xhat.sizes(),
              " and ", G.sizes());
  const c10::cuda::CUDAGuard guard(G.device());
  at::Tensor x = xhat, g = G;
  if (xhat.scalar_type() != G.scalar_type()) {  // mixed dtypes meet in G's accumulation dtype, as the reference
    x = xhat.to(acc_type(G.scalar_type()));
    g = G.to(acc_type(G.scalar_type()));
  }
  const int64_t S = G.size(-1);
  int64_t rows = 1;  // from the shape, not numel / S: S may be 0
  for (int64_t i = 0; i + 1 < G.dim(); ++i) rows *= G.size(i);
  x = x.reshape({rows, S}).contiguous();
  g = g.reshape({rows, S}).contiguous();
  at::Tensor out = at::empty({rows}, acc_options(g));
  dispatch_floating(g.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_affine_grad_sample<T>(ptr<T>(x), ptr<T>(g), mutable_ptr<acc_of<T>>(out), rows, S, stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out.reshape(G.sizes().slice(0, G.dim() - 1));
}

// ids [B, ...] and G [B, ..., D] -> contiguous int64 [B, T] and [B, T, D].
struct EmbeddingInputs {
  at::Tensor ids, G;
};

EmbeddingInputs embedding_inputs(const at::Tensor& ids, const at::Tensor& G, const char* op) {
  check_cuda(ids, op, "ids");
  check_cuda(G, op, "G");
  check_floating(G, "G", op);
  check_same_device(ids, G, op);
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, "dpkernels.", op,
              ": ids must be int64 (or int32), got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() >= 1 && G.dim() == ids.dim() + 1 && G.sizes().slice(0, ids.dim()) == ids.sizes(),
              "dpkernels.", op, ": G must have shape ids.shape + [D], got ids ", ids.sizes(), " and G ", G.sizes());
  const int64_t B = ids.size(0), D = G.size(-1);
  int64_t n_tok = 1;
  for (int64_t i = 1; i < ids.dim(); ++i) n_tok *= ids.size(i);
  return {ids.reshape({B, n_tok}).to(at::kLong).contiguous(), G.reshape({B, n_tok, D}).contiguous()};
}

at::Tensor embedding_norm(const at::Tensor& ids, const at::Tensor& G) {
  const char* op = "embedding_norm";
  const EmbeddingInputs in = embedding_inputs(ids, G, op);
  const at::Tensor& ids2 = in.ids;
  const at::Tensor& G3 = in.G;
  const c10::cuda::CUDAGuard guard(G.device());
  at::Tensor out = at::zeros({G3.size(0)}, acc_options(G3));
  dispatch_floating(G3.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_embedding_norm<T>(ptr<int64_t>(ids2), ptr<T>(G3), mutable_ptr<acc_of<T>>(out), G3.size(0), G3.size(1),
                             G3.size(2), stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor embedding_clipped_sum(const at::Tensor& ids, const at::Tensor& G, const at::Tensor& c,
                                 int64_t num_embeddings, double noise_std, int64_t seed, int64_t offset) {
  const char* op = "embedding_clipped_sum";
  const EmbeddingInputs in = embedding_inputs(ids, G, op);
  const at::Tensor& ids2 = in.ids;
  const at::Tensor& G3 = in.G;
  check_noise_args(noise_std, seed, offset, op);
  TORCH_CHECK(num_embeddings >= 0, "dpkernels.embedding_clipped_sum: num_embeddings must be >= 0, got ",
              num_embeddings);
  const c10::cuda::CUDAGuard guard(G.device());
  const at::Tensor cw = clip_factors(c, G3.size(0), G3, op, "c");
  at::Tensor out = at::zeros({num_embeddings, G3.size(2)}, acc_options(G3));
  dispatch_floating(G3.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_of<T>;
    // Noise covers the whole table (untouched rows too), then the clipped rows land on it.
    launch_add_noise<acc_t>(mutable_ptr<acc_t>(out), out.numel(), noise_std, uint64_t(seed), uint64_t(offset),
                            stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_embedding_scatter<T>(ptr<int64_t>(ids2), ptr<T>(G3), ptr<acc_t>(cw), mutable_ptr<acc_t>(out), G3.size(0),
                                G3.size(1), G3.size(2), num_embeddings, stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor add_noise_(at::Tensor x, double std, int64_t seed, int64_t offset) {
  const char* op = "add_noise_";
  check_cuda(x, op, "x");
  check_floating(x, "x", op);
  check_noise_args(std, seed, offset, op);
  const c10::cuda::CUDAGuard guard(x.device());
  // Element i in row-major order takes counter offset + i: work on a contiguous buffer.
  at::Tensor buf = x.is_contiguous() ? x : x.contiguous();
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_add_noise<T>(mutable_ptr<T>(buf), buf.numel(), std, uint64_t(seed), uint64_t(offset), stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!buf.is_same(x)) x.copy_(buf);
  return x;
}

}  // namespace

TORCH_LIBRARY_IMPL(dpkernels, CUDA, m) {
  m.impl("ghost_norm", TORCH_FN(ghost_norm));
  m.impl("direct_norm", TORCH_FN(direct_norm));
  m.impl("clipped_sum", TORCH_FN(clipped_sum));
  m.impl("sq_norms", TORCH_FN(sq_norms));
  m.impl("clipped_rows_sum", TORCH_FN(clipped_rows_sum));
  m.impl("affine_grad_sample", TORCH_FN(affine_grad_sample));
  m.impl("embedding_norm", TORCH_FN(embedding_norm));
  m.impl("embedding_clipped_sum", TORCH_FN(embedding_clipped_sum));
  m.impl("add_noise_", TORCH_FN(add_noise_));
}

}  // namespace cuda
}  // namespace dpkernels
