// Launchers of the CUDA reference kernels (attention_forward.cu, attention_backward.cu).
// Torch-free: raw pointers and strides in ForwardArgs / BackwardArgs, a CUDA stream.
#pragma once

#include <cuda_runtime.h>

#include "attention_reference.cuh"

namespace flashtile_ref {

// Launch on `stream` (asynchronous); return the launch's error, cudaSuccess if none.
// Pointers must be device pointers on the current device. Sizes of zero launch nothing
// (a zero-length key sequence still writes O = 0 and L = -inf).
cudaError_t forward_cuda(const ForwardArgs& args, cudaStream_t stream);
cudaError_t backward_cuda(const BackwardArgs& args, cudaStream_t stream);

}  // namespace flashtile_ref
