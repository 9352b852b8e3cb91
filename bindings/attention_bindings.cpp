// pybind11 module flashtile._cuda_reference: the torch glue of the CUDA reference.
//
// Checks shapes, dtypes and devices, allocates the float32 outputs, and launches the
// torch-free launchers of cuda_reference/ on the current CUDA stream (CUDA tensors, in a
// build with FLASHTILE_WITH_CUDA) or runs the host build (CPU tensors, in every build).
//
//   forward(q, k, v, causal, scale) -> (out, lse)            out (B, H, Nq, D), lse (B, H, Nq)
//   backward(d_out, q, k, v, out, lse, causal, scale) -> (dq, dk, dv)
// All outputs are float32 and contiguous; q, k, v, d_out are fp16, bf16 or fp32 (one
// dtype) with any strides; `out` and `lse` are forward's float32 results.
#include <torch/extension.h>

#include <cstdio>
#include <string>
#include <type_traits>

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

Strides strides_of(const at::Tensor& t) { return Strides{t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

void check_4d(const at::Tensor& t, const char* name) {
  FT_CHECK(t.dim() == 4, name, " must be 4-D (batch, heads, seq, head_dim), got ", t.sizes());
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

// The problem (B, H, Nq, Nk, D) of q, k, v, checked.
Problem check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale) {
  check_4d(q, "q");
  check_4d(k, "k");
  check_4d(v, "v");
  dtype_of(q, "q");  // raises TypeError for an unsupported dtype
  FT_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                "q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                v.scalar_type());
  check_device(q, q, "q");
  check_device(k, q, "k");
  check_device(v, q, "v");
  FT_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "batch sizes differ: q ", q.size(0), ", k ",
           k.size(0), ", v ", v.size(0));
  FT_CHECK(k.size(1) == q.size(1) && v.size(1) == q.size(1), "head counts differ: q ", q.size(1), ", k ",
           k.size(1), ", v ", v.size(1));
  FT_CHECK(k.size(2) == v.size(2), "k and v must have the same sequence length, got ", k.size(2), " and ",
           v.size(2));
  FT_CHECK(k.size(3) == q.size(3) && v.size(3) == q.size(3), "head_dim differs: q ", q.size(3), ", k ",
           k.size(3), ", v ", v.size(3));
  FT_CHECK(q.size(3) >= 1 && q.size(3) <= flashtile_ref::kMaxHeadDim, "head_dim must be in 1..",
           flashtile_ref::kMaxHeadDim, ", got ", q.size(3));
  FT_CHECK(std::isfinite(scale) && scale > 0, "scale must be finite and positive, got ", scale);
  Problem p;
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.n_q = q.size(2);
  p.n_k = k.size(2);
  p.head_dim = int(q.size(3));
  p.scale = float(scale);
  p.causal = causal;
  return p;
}

void check_float32(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& q) {
  FT_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32 (the forward's), got ",
                t.scalar_type());
  FT_CHECK(t.sizes() == shape, name, " has shape ", t.sizes(), ", expected ", shape);
  check_device(t, q, name);
}

// The fields ForwardArgs and BackwardArgs share: problem, dtype, q, k, v and their strides.
template <typename Args>
void set_inputs(Args& a, const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  a.p = p;
  a.dtype = dtype_of(q, "q");
  a.q = q.data_ptr();
  a.q_st = strides_of(q);
  a.k = k.data_ptr();
  a.k_st = strides_of(k);
  a.v = v.data_ptr();
  a.v_st = strides_of(v);
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

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                                double scale) {
  const Problem p = check_qkv(q, k, v, causal, scale);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor out = at::empty({p.batch, p.heads, p.n_q, p.head_dim}, f32);
  at::Tensor lse = at::empty({p.batch, p.heads, p.n_q}, f32);
  flashtile_ref::ForwardArgs a;
  set_inputs(a, p, q, k, v);
  a.out = out.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  run_pass("forward", q, a);
  return {out, lse};
}

std::vector<at::Tensor> backward(const at::Tensor& d_out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, bool causal,
                                 double scale) {
  const Problem p = check_qkv(q, k, v, causal, scale);
  check_4d(d_out, "d_out");
  FT_CHECK_TYPE(d_out.scalar_type() == q.scalar_type(), "d_out has dtype ", d_out.scalar_type(),
                ", expected q's ", q.scalar_type());
  FT_CHECK(d_out.sizes() == q.sizes(), "d_out has shape ", d_out.sizes(), ", expected q's ", q.sizes());
  check_device(d_out, q, "d_out");
  check_float32(out, "out", q.sizes(), q);
  check_float32(lse, "lse", {p.batch, p.heads, p.n_q}, q);
  // The kernels read out and lse as contiguous float32 (as forward returns them).
  const at::Tensor out_c = out.contiguous(), lse_c = lse.contiguous();
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq = at::empty({p.batch, p.heads, p.n_q, p.head_dim}, f32);
  at::Tensor dk = at::empty({p.batch, p.heads, p.n_k, p.head_dim}, f32);
  at::Tensor dv = at::empty({p.batch, p.heads, p.n_k, p.head_dim}, f32);
  at::Tensor delta = at::empty({p.batch, p.heads, p.n_q}, f32);
  flashtile_ref::BackwardArgs a;
  set_inputs(a, p, q, k, v);
  a.d_out = d_out.data_ptr();
  a.do_st = strides_of(d_out);
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
  m.def("forward", &forward, "(out, lse) of softmax(scale q k^T) v, float32", pybind11::arg("q"),
        pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("causal"), pybind11::arg("scale"));
  m.def("backward", &backward, "(dq, dk, dv), float32", pybind11::arg("d_out"), pybind11::arg("q"),
        pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("out"), pybind11::arg("lse"),
        pybind11::arg("causal"), pybind11::arg("scale"));
  m.def("storage_to_float", &storage_to_float, "the reference's own fp16/bf16/fp32 -> float32 conversion");
  m.attr("with_cuda") = kWithCuda;
  m.attr("max_head_dim") = flashtile_ref::kMaxHeadDim;
}
