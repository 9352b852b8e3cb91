// pybind11 module flashtile._cuda_reference: the torch glue of the CUDA reference.
//
// Checks shapes, dtypes and devices, allocates the float32 outputs, and launches the
// torch-free launchers of cuda_reference/ on the current CUDA stream (CUDA tensors, in a
// build with FLASHTILE_WITH_CUDA) or runs the host build (CPU tensors, in every build).
//
//   forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
//           window_left, window_right, softcap) -> (out, lse)
//   backward(d_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
//            scale, window_left, window_right, softcap) -> (dq, dk, dv)
// Dense (cu_seqlens_* None): q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D); out (B, Hq, Nq, D),
// lse (B, Hq, Nq); max_seqlen_* are not used. Varlen: q (total_q, Hq, D), k and v
// (total_k, Hkv, D), cu_seqlens_* int32 (B + 1,) on q's device, max_seqlen_* the longest
// sequence's lengths (they size the CUDA grid); out (total_q, Hq, D), lse (Hq, total_q).
// Hq a multiple of Hkv; dk, dv have k's shape. Window sides -1 (unbounded) or >= 0, causal
// being window_right = 0; softcap 0 (off) or > 0. The values inside cu_seqlens (from 0,
// non-decreasing, ending at the row count, no sequence longer than max_seqlen) are the
// caller's contract, as in FlashAttention-2.
// All outputs are float32 and contiguous; q, k, v, d_out are fp16, bf16 or fp32 (one
// dtype) with any strides; `out` and `lse` are forward's float32 results.
#include <torch/extension.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "../cuda_reference/attention_reference.cuh"

#ifdef FLASHTILE_WITH_CUDA
// c10's stream and guard headers, not ATen/cuda/CUDAContext.h: they need only the CUDA
// runtime's headers (no cuBLAS / cuSPARSE headers at build time).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../cuda_reference/attention_cuda.h"
#endif

namespace {

using flashtile_ref::DType;
using flashtile_ref::Problem;
using flashtile_ref::Strides;

#ifdef FLASHTILE_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

// Error messages are built without iostreams: append() below writes each part with
// std::to_string, snprintf or torch's own string functions. Where the extension ends up
// with its own static copy of libstdc++ beside the process's shared one (the GPU machine's
// build: `nm -D` shows it defining __cxa_throw, and it does not NEED libstdc++.so), a
// std::ostringstream in this module cannot format numbers: the num_put facet it looks up
// belongs to the other copy's locale. Built here with -static-libstdc++, that cut a message
// off at its first number (tests/test_cuda_reference.py checks it); on the GPU machine the
// pytest process segfaulted at the first message with a number in three runs, and with
// these messages the same tests pass there. TORCH_CHECK formats with an ostringstream in
// this module too, so it is not used.
void append(std::string& message, const char* text) { message += text; }
void append(std::string& message, double x) {
  char text[32];
  std::snprintf(text, sizeof text, "%g", x);
  message += text;
}
template <typename Int, typename = std::enable_if_t<std::is_integral_v<Int>>>
void append(std::string& message, Int x) { message += std::to_string(x); }
void append(std::string& message, at::ScalarType type) { message += c10::toString(type); }
void append(std::string& message, const c10::Device& device) { message += device.str(); }
void append(std::string& message, at::IntArrayRef sizes) {
  message += "[";
  for (size_t i = 0; i < sizes.size(); ++i) message += (i ? ", " : "") + std::to_string(sizes[i]);
  message += "]";
}

// The bindings' own errors are Python exceptions set here: PyErr_SetString sets TypeError or
// RuntimeError, and pybind11::error_already_set carries it out, which pybind11's dispatcher
// restores before any exception translator runs. Called with the GIL held.
template <typename... Parts>
[[noreturn]] void raise_error(PyObject* type, const Parts&... parts) {
  std::string message;
  (append(message, parts), ...);
  PyErr_SetString(type, message.c_str());
  throw pybind11::error_already_set();
}

#define FT_CHECK(cond, ...)                                          \
  do {                                                               \
    if (!(cond)) raise_error(PyExc_RuntimeError, __VA_ARGS__);       \
  } while (0)
#define FT_CHECK_TYPE(cond, ...)                                     \
  do {                                                               \
    if (!(cond)) raise_error(PyExc_TypeError, __VA_ARGS__);          \
  } while (0)

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      FT_CHECK_TYPE(false, name, " has dtype ", t.scalar_type(),
                    "; the CUDA reference supports float16, bfloat16 and float32");
  }
  return DType::kFloat32;  // unreachable
}

// (b, h, row, d) strides of a dense (B, H, N, D) tensor, or of a varlen (total, H, D) one
// (batch stride 0: its rows are absolute, see flashtile_ref::Sequence).
Strides strides_of(const at::Tensor& t, bool varlen) {
  if (varlen) return Strides{0, t.stride(1), t.stride(0), t.stride(2)};
  return Strides{t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Sizes in either layout: heads are dim 1 of both, rows (per sequence or in all) and head_dim move.
int64_t heads_of(const at::Tensor& t) { return t.size(1); }
int64_t rows_of(const at::Tensor& t, bool varlen) { return t.size(varlen ? 0 : 2); }
int64_t head_dim_of(const at::Tensor& t, bool varlen) { return t.size(varlen ? 2 : 3); }

void check_dims(const at::Tensor& t, const char* name, bool varlen) {
  if (varlen) {
    FT_CHECK(t.dim() == 3, name, " must be 3-D (total, heads, head_dim) with cu_seqlens, got ", t.sizes());
  } else {
    FT_CHECK(t.dim() == 4, name, " must be 4-D (batch, heads, seq, head_dim), got ", t.sizes());
  }
}

void check_device(const at::Tensor& t, const at::Tensor& q, const char* name) {
  FT_CHECK(t.device() == q.device(), name, " is on ", t.device(), " but q is on ", q.device());
  if (t.is_cuda()) {
    FT_CHECK(kWithCuda,
             "flashtile's CUDA reference was built without CUDA (the host build: torch without CUDA or "
             "no nvcc when it was installed); it runs on CPU tensors only");
  } else {
    FT_CHECK(t.is_cpu(), name, " is on ", t.device(), "; the CUDA reference runs on CUDA or CPU tensors");
  }
}

// cu_seqlens_q or cu_seqlens_k: int32 (batch + 1,) on q's device. Returns a contiguous copy
// (or itself), which the caller keeps alive while the launchers read it.
at::Tensor check_cu_seqlens(const at::Tensor& cu, const at::Tensor& q, const char* name) {
  FT_CHECK_TYPE(cu.scalar_type() == at::kInt, name, " must be int32, got ", cu.scalar_type());
  FT_CHECK(cu.dim() == 1 && cu.size(0) >= 1, name, " must be 1-D (batch + 1,), got ", cu.sizes());
  check_device(cu, q, name);
  return cu.contiguous();
}

// The problem of q, k, v and the arguments, checked; for varlen also the contiguous
// cu_seqlens the launchers read (held here so that they outlive the launch).
struct Checked {
  Problem p;
  bool varlen;
  at::Tensor cu_seqlens_q, cu_seqlens_k;
};

Checked check_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                      std::optional<int64_t> max_seqlen_q, std::optional<int64_t> max_seqlen_k, double scale,
                      int64_t window_left, int64_t window_right, double softcap) {
  Checked c;
  c.varlen = cu_seqlens_q.has_value();
  const bool varlen = c.varlen;
  FT_CHECK(cu_seqlens_k.has_value() == varlen, "cu_seqlens_q and cu_seqlens_k must be given together (varlen) "
           "or both be None (dense)");
  check_dims(q, "q", varlen);
  check_dims(k, "k", varlen);
  check_dims(v, "v", varlen);
  dtype_of(q, "q");  // raises TypeError for an unsupported dtype
  FT_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                "q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                v.scalar_type());
  check_device(q, q, "q");
  check_device(k, q, "k");
  check_device(v, q, "v");
  if (!varlen) {
    FT_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "batch sizes differ: q ", q.size(0), ", k ",
             k.size(0), ", v ", v.size(0));
  }
  const int64_t heads_q = heads_of(q), heads_kv = heads_of(k);
  FT_CHECK(heads_of(v) == heads_kv, "k and v must have the same number of heads, got ", heads_kv, " and ",
           heads_of(v));
  FT_CHECK(heads_kv > 0 ? heads_q % heads_kv == 0 : heads_q == 0, "q's head count (", heads_q,
           ") must be a multiple of k's and v's (", heads_kv, ")");
  FT_CHECK(rows_of(k, varlen) == rows_of(v, varlen), "k and v must have the same sequence length, got ",
           rows_of(k, varlen), " and ", rows_of(v, varlen));
  const int64_t head_dim = head_dim_of(q, varlen);
  FT_CHECK(head_dim_of(k, varlen) == head_dim && head_dim_of(v, varlen) == head_dim, "head_dim differs: q ",
           head_dim, ", k ", head_dim_of(k, varlen), ", v ", head_dim_of(v, varlen));
  FT_CHECK(head_dim >= 1 && head_dim <= flashtile_ref::kMaxHeadDim, "head_dim must be in 1..",
           flashtile_ref::kMaxHeadDim, ", got ", head_dim);
  FT_CHECK(std::isfinite(scale) && scale > 0, "scale must be finite and positive, got ", scale);
  FT_CHECK(window_left >= -1, "window_left must be >= -1 (-1: unbounded), got ", window_left);
  FT_CHECK(window_right >= -1, "window_right must be >= -1 (-1: unbounded), got ", window_right);
  FT_CHECK(std::isfinite(softcap) && softcap >= 0, "softcap must be finite and >= 0 (0: off), got ", softcap);

  Problem& p = c.p;
  p.heads_q = heads_q;
  p.heads_kv = heads_kv;
  p.head_dim = int(head_dim);
  p.scale = float(scale);
  // A side wider than any sequence is unbounded in effect; capping it keeps the bounds'
  // arithmetic (position - left, position + right + 1) far from int64 overflow.
  constexpr int64_t kWidest = int64_t(1) << 50;
  p.window_left = window_left < kWidest ? window_left : kWidest;
  p.window_right = window_right < kWidest ? window_right : kWidest;
  p.softcap = float(softcap);
  if (varlen) {
    c.cu_seqlens_q = check_cu_seqlens(*cu_seqlens_q, q, "cu_seqlens_q");
    c.cu_seqlens_k = check_cu_seqlens(*cu_seqlens_k, q, "cu_seqlens_k");
    FT_CHECK(c.cu_seqlens_q.size(0) == c.cu_seqlens_k.size(0), "cu_seqlens_q and cu_seqlens_k must have the "
             "same length (batch + 1), got ", c.cu_seqlens_q.size(0), " and ", c.cu_seqlens_k.size(0));
    FT_CHECK(max_seqlen_q.has_value() && max_seqlen_k.has_value(),
             "max_seqlen_q and max_seqlen_k are required with cu_seqlens");
    FT_CHECK(*max_seqlen_q >= 0 && *max_seqlen_k >= 0, "max_seqlen_q and max_seqlen_k must be >= 0, got ",
             *max_seqlen_q, " and ", *max_seqlen_k);
    p.batch = c.cu_seqlens_q.size(0) - 1;
    p.n_q = *max_seqlen_q;
    p.n_k = *max_seqlen_k;
    p.total_q = q.size(0);
    p.cu_seqlens_q = c.cu_seqlens_q.data_ptr<int32_t>();
    p.cu_seqlens_k = c.cu_seqlens_k.data_ptr<int32_t>();
  } else {
    p.batch = q.size(0);
    p.n_q = q.size(2);
    p.n_k = k.size(2);
    p.total_q = 0;
    p.cu_seqlens_q = p.cu_seqlens_k = nullptr;
  }
  return c;
}

// lse's shape: dense (B, Hq, Nq), varlen (Hq, total_q).
std::vector<int64_t> lse_shape(const at::Tensor& q, bool varlen) {
  if (varlen) return {q.size(1), q.size(0)};
  return {q.size(0), q.size(1), q.size(2)};
}

void check_float32(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& q) {
  FT_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32 (the forward's), got ",
                t.scalar_type());
  FT_CHECK(t.sizes() == shape, name, " has shape ", t.sizes(), ", expected ", shape);
  check_device(t, q, name);
}

// The fields ForwardArgs and BackwardArgs share: problem, dtype, q, k, v and their strides.
template <typename Args>
void set_inputs(Args& a, const Checked& c, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  a.p = c.p;
  a.dtype = dtype_of(q, "q");
  a.q = q.data_ptr();
  a.q_st = strides_of(q, c.varlen);
  a.k = k.data_ptr();
  a.k_st = strides_of(k, c.varlen);
  a.v = v.data_ptr();
  a.v_st = strides_of(v, c.varlen);
}

// The launchers of each pass, by argument type, so that one `run_pass` serves both.
const char* run_host(const flashtile_ref::ForwardArgs& a) { return flashtile_ref::forward_host(a); }
const char* run_host(const flashtile_ref::BackwardArgs& a) { return flashtile_ref::backward_host(a); }
#ifdef FLASHTILE_WITH_CUDA
cudaError_t run_cuda(const flashtile_ref::ForwardArgs& a, cudaStream_t s) { return flashtile_ref::forward_cuda(a, s); }
cudaError_t run_cuda(const flashtile_ref::BackwardArgs& a, cudaStream_t s) { return flashtile_ref::backward_cuda(a, s); }
#endif

// Runs one pass: the CUDA launcher on q's device and current stream for CUDA tensors (only
// in a build with FLASHTILE_WITH_CUDA: check_device refuses CUDA tensors otherwise), else the
// host build with the GIL released. `what` names the pass in the error message.
template <typename Args>
void run_pass(const char* what, const at::Tensor& q, const Args& a) {
  if (q.is_cuda()) {
#ifdef FLASHTILE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    const cudaError_t err = run_cuda(a, c10::cuda::getCurrentCUDAStream().stream());
    FT_CHECK(err == cudaSuccess, "flashtile CUDA reference ", what, ": ", cudaGetErrorString(err));
#endif
    return;
  }
  const char* problem;
  {
    pybind11::gil_scoped_release no_gil;
    problem = run_host(a);
  }
  FT_CHECK(problem == nullptr, "flashtile CUDA reference ", what, " (host build): ", problem);
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& cu_seqlens_q,
                                const std::optional<at::Tensor>& cu_seqlens_k, std::optional<int64_t> max_seqlen_q,
                                std::optional<int64_t> max_seqlen_k, double scale, int64_t window_left,
                                int64_t window_right, double softcap) {
  const Checked c = check_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                  window_left, window_right, softcap);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor out = at::empty(q.sizes(), f32);
  at::Tensor lse = at::empty(lse_shape(q, c.varlen), f32);
  flashtile_ref::ForwardArgs a;
  set_inputs(a, c, q, k, v);
  a.out = out.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  run_pass("forward", q, a);
  return {out, lse};
}

std::vector<at::Tensor> backward(const at::Tensor& d_out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                 const std::optional<at::Tensor>& cu_seqlens_q,
                                 const std::optional<at::Tensor>& cu_seqlens_k, std::optional<int64_t> max_seqlen_q,
                                 std::optional<int64_t> max_seqlen_k, double scale, int64_t window_left,
                                 int64_t window_right, double softcap) {
  const Checked c = check_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                  window_left, window_right, softcap);
  check_dims(d_out, "d_out", c.varlen);
  FT_CHECK_TYPE(d_out.scalar_type() == q.scalar_type(), "d_out has dtype ", d_out.scalar_type(),
                ", expected q's ", q.scalar_type());
  FT_CHECK(d_out.sizes() == q.sizes(), "d_out has shape ", d_out.sizes(), ", expected q's ", q.sizes());
  check_device(d_out, q, "d_out");
  check_float32(out, "out", q.sizes(), q);
  check_float32(lse, "lse", lse_shape(q, c.varlen), q);
  // The kernels read out and lse as contiguous float32 (as forward returns them).
  const at::Tensor out_c = out.contiguous(), lse_c = lse.contiguous();
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq = at::empty(q.sizes(), f32);
  at::Tensor dk = at::empty(k.sizes(), f32);
  at::Tensor dv = at::empty(k.sizes(), f32);
  at::Tensor delta = at::empty(lse_shape(q, c.varlen), f32);
  flashtile_ref::BackwardArgs a;
  set_inputs(a, c, q, k, v);
  a.d_out = d_out.data_ptr();
  a.do_st = strides_of(d_out, c.varlen);
  a.out = out_c.data_ptr<float>();
  a.lse = lse_c.data_ptr<float>();
  a.delta = delta.data_ptr<float>();
  a.dq = dq.data_ptr<float>();
  a.dk = dk.data_ptr<float>();
  a.dv = dv.data_ptr<float>();
  run_pass("backward", q, a);
  return {dq, dk, dv};
}

// The storage conversion both builds use (flashtile_ref::to_float), on a CPU tensor, for
// the tests: they compare it with torch's over every fp16 and bf16 bit pattern.
at::Tensor storage_to_float(const at::Tensor& x) {
  FT_CHECK(x.is_cpu(), "storage_to_float takes a CPU tensor");
  const at::Tensor c = x.contiguous();
  at::Tensor result = at::empty(c.sizes(), c.options().dtype(at::kFloat));
  float* dst = result.data_ptr<float>();
  const int64_t n = c.numel();
  switch (dtype_of(c, "x")) {
    case DType::kFloat32:
      for (int64_t e = 0; e < n; ++e) dst[e] = flashtile_ref::load<float>(c.data_ptr(), e);
      break;
    case DType::kFloat16:
      for (int64_t e = 0; e < n; ++e) dst[e] = flashtile_ref::load<flashtile_ref::Half>(c.data_ptr(), e);
      break;
    case DType::kBFloat16:
      for (int64_t e = 0; e < n; ++e) dst[e] = flashtile_ref::load<flashtile_ref::BFloat16>(c.data_ptr(), e);
      break;
  }
  return result;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flashtile's CUDA reference attention (forward and backward, float32 outputs)";
  namespace py = pybind11;
  m.def("forward", &forward, "(out, lse) of softmax(scores) v, float32 (see the module's comment)", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"),
        py::arg("max_seqlen_k"), py::arg("scale"), py::arg("window_left"), py::arg("window_right"),
        py::arg("softcap"));
  m.def("backward", &backward, "(dq, dk, dv), float32", py::arg("d_out"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
        py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("scale"), py::arg("window_left"),
        py::arg("window_right"), py::arg("softcap"));
  m.def("storage_to_float", &storage_to_float, "the reference's own fp16/bf16/fp32 -> float32 conversion");
  m.attr("with_cuda") = kWithCuda;
  m.attr("max_head_dim") = flashtile_ref::kMaxHeadDim;
}
