// Fused CPU kernels for the WaveNet training step's element-wise work (dwave/fused_ops.py
// builds this file with the host's compiler and loads it; the model falls back to TensorFlow's
// own ops where it cannot).
//
// Why: on a CPU the step's matrix products run near the machine's rate, and most of the rest
// was TensorFlow running the gated unit and the dilated conv's input as chains of separate
// passes over (positions x channels) tensors: split, tanh, sigmoid, multiply and their
// gradients; slice, slice, concatenate and their gradients (issue 12's profile of `small`:
// ~50 of 190 ms). Each op below is one pass.
//
//   DwaveGate(fg) -> z                   z = tanh(f) * sigmoid(g), fg = [f | g] on the last axis
//   DwaveGateGrad(fg, dz) -> dfg         its gradient, tanh and sigmoid recomputed from fg
//   DwavePairs(h, dilation) -> x         x[:, t] = [h[:, t] | h[:, t + d]], t < L - d
//   DwavePairsGrad(dx, dilation) -> dh   its gradient
//
// sigmoid(g) is computed as 0.5 + 0.5 tanh(g / 2): one vectorised tanh (Eigen's rational
// approximation, the one TensorFlow's Tanh uses) serves both halves, where TensorFlow's own
// Sigmoid took 2.2x the time of its Tanh. Results match TensorFlow's ops to ~1e-6
// (tests/test_fused_ops.py).

#include <algorithm>
#include <cstring>
#include <vector>

#include "tensorflow/core/framework/bfloat16.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::errors::InvalidArgument;
namespace si = tensorflow::shape_inference;

typedef Eigen::Map<const Eigen::ArrayXf> ConstRow;
typedef Eigen::Map<Eigen::ArrayXf> Row;

// Runs work(begin, end) over [0, rows) on the op's intra-op threads; cost: cycles per row.
template <typename Work>
void ForRows(OpKernelContext* ctx, int64_t rows, int64_t cost, Work work) {
  auto* threads = ctx->device()->tensorflow_cpu_worker_threads();
  tensorflow::Shard(threads->num_threads, threads->workers, rows, cost, work);
}

// ---------------------------------------------------------------------------------------------
// The gated unit.

class GateOp : public OpKernel {
 public:
  explicit GateOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& fg = ctx->input(0);
    OP_REQUIRES(ctx, fg.dims() >= 1 && fg.dim_size(fg.dims() - 1) % 2 == 0,
                InvalidArgument("DwaveGate: the last axis must hold [filter | gate]"));
    const int64_t width = fg.dim_size(fg.dims() - 1), d = width / 2;
    TensorShape shape = fg.shape();
    shape.set_dim(fg.dims() - 1, d);
    Tensor* z = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &z));
    if (d == 0 || z->NumElements() == 0) return;
    const float* in = fg.flat<float>().data();
    float* out = z->flat<float>().data();
    ForRows(ctx, z->NumElements() / d, 40 * d, [=](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        ConstRow f(in + r * width, d), g(in + r * width + d, d);
        Row(out + r * d, d) = f.tanh() * (0.5f + 0.5f * (0.5f * g).tanh());
      }
    });
  }
};

class GateGradOp : public OpKernel {
 public:
  explicit GateGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& fg = ctx->input(0);
    const Tensor& dz = ctx->input(1);
    const int64_t width = fg.dim_size(fg.dims() - 1), d = width / 2;
    OP_REQUIRES(ctx, dz.NumElements() * 2 == fg.NumElements(),
                InvalidArgument("DwaveGateGrad: dz must have half of fg's elements"));
    Tensor* dfg = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, fg.shape(), &dfg));
    if (d == 0 || fg.NumElements() == 0) return;
    const float* in = fg.flat<float>().data();
    const float* grad = dz.flat<float>().data();
    float* out = dfg->flat<float>().data();
    ForRows(ctx, fg.NumElements() / width, 60 * d, [=](int64_t begin, int64_t end) {
      Eigen::ArrayXf t(d), s(d);  // tanh(f), sigmoid(g) of one row
      for (int64_t r = begin; r < end; ++r) {
        ConstRow f(in + r * width, d), g(in + r * width + d, d), dzr(grad + r * d, d);
        t = f.tanh();
        s = 0.5f + 0.5f * (0.5f * g).tanh();
        Row(out + r * width, d) = dzr * s * (1.0f - t * t);
        Row(out + r * width + d, d) = dzr * t * s * (1.0f - s);
      }
    });
  }
};

// ---------------------------------------------------------------------------------------------
// The kernel-2 dilated conv's input: each position's [past | now] pair, for a valid conv.

template <typename T>
class PairsOp : public OpKernel {
 public:
  explicit PairsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dilation", &dilation_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& h = ctx->input(0);
    OP_REQUIRES(ctx, h.dims() == 3, InvalidArgument("DwavePairs: h must be (batch, time, channels)"));
    const int64_t batch = h.dim_size(0), length = h.dim_size(1), c = h.dim_size(2);
    OP_REQUIRES(ctx, dilation_ >= 0 && dilation_ < length,
                InvalidArgument("DwavePairs: dilation ", dilation_, " needs more than ", dilation_,
                                " positions, got ", length));
    const int64_t out_len = length - dilation_, d = dilation_;
    Tensor* x = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({batch, out_len, 2 * c}), &x));
    if (x->NumElements() == 0) return;
    const T* in = h.flat<T>().data();
    T* out = x->flat<T>().data();
    ForRows(ctx, batch * out_len, 2 * c, [=](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / out_len, t = r % out_len;
        const T* past = in + (b * length + t) * c;
        std::memcpy(out + r * 2 * c, past, c * sizeof(T));
        std::memcpy(out + r * 2 * c + c, past + d * c, c * sizeof(T));
      }
    });
  }

 private:
  int dilation_;
};

template <typename T>
class PairsGradOp : public OpKernel {
 public:
  explicit PairsGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dilation", &dilation_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dx = ctx->input(0);
    OP_REQUIRES(ctx, dx.dims() == 3 && dx.dim_size(2) % 2 == 0,
                InvalidArgument("DwavePairsGrad: dx must be (batch, time, 2 * channels)"));
    const int64_t batch = dx.dim_size(0), out_len = dx.dim_size(1), c = dx.dim_size(2) / 2;
    const int64_t d = dilation_, length = out_len + d;
    Tensor* dh = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({batch, length, c}), &dh));
    if (dh->NumElements() == 0) return;
    const T* in = dx.flat<T>().data();
    T* out = dh->flat<T>().data();
    // dh[t] = dx[t, past half] (t < L - d) + dx[t - d, now half] (t >= d)
    ForRows(ctx, batch * length, 2 * c, [=](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / length, t = r % length;
        T* row = out + r * c;
        const T* as_past = t < out_len ? in + (b * out_len + t) * 2 * c : nullptr;
        const T* as_now = t >= d ? in + (b * out_len + t - d) * 2 * c + c : nullptr;
        if (as_past && as_now) {
          for (int64_t j = 0; j < c; ++j)
            row[j] = static_cast<T>(static_cast<float>(as_past[j]) + static_cast<float>(as_now[j]));
        } else if (as_past || as_now) {
          std::memcpy(row, as_past ? as_past : as_now, c * sizeof(T));
        } else {
          std::fill(row, row + c, T(0));
        }
      }
    });
  }

 private:
  int dilation_;
};

}  // namespace

REGISTER_OP("DwaveGate")
    .Input("fg: float")
    .Output("z: float")
    .SetShapeFn([](si::InferenceContext* c) {
      si::ShapeHandle in = c->input(0), out;
      si::DimensionHandle half;
      TF_RETURN_IF_ERROR(c->WithRankAtLeast(in, 1, &in));
      TF_RETURN_IF_ERROR(c->Divide(c->Dim(in, -1), 2, true, &half));
      TF_RETURN_IF_ERROR(c->ReplaceDim(in, -1, half, &out));
      c->set_output(0, out);
      return tensorflow::OkStatus();
    });

REGISTER_OP("DwaveGateGrad")
    .Input("fg: float")
    .Input("dz: float")
    .Output("dfg: float")
    .SetShapeFn([](si::InferenceContext* c) {
      c->set_output(0, c->input(0));
      return tensorflow::OkStatus();
    });

REGISTER_OP("DwavePairs")
    .Input("h: T")
    .Output("x: T")
    .Attr("T: {float, bfloat16}")
    .Attr("dilation: int >= 0")
    .SetShapeFn([](si::InferenceContext* c) {
      si::ShapeHandle in;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &in));
      int dilation;
      TF_RETURN_IF_ERROR(c->GetAttr("dilation", &dilation));
      si::DimensionHandle length, width;
      TF_RETURN_IF_ERROR(c->Subtract(c->Dim(in, 1), dilation, &length));
      TF_RETURN_IF_ERROR(c->Multiply(c->Dim(in, 2), 2, &width));
      c->set_output(0, c->MakeShape({c->Dim(in, 0), length, width}));
      return tensorflow::OkStatus();
    });

REGISTER_OP("DwavePairsGrad")
    .Input("dx: T")
    .Output("dh: T")
    .Attr("T: {float, bfloat16}")
    .Attr("dilation: int >= 0")
    .SetShapeFn([](si::InferenceContext* c) {
      si::ShapeHandle in;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &in));
      int dilation;
      TF_RETURN_IF_ERROR(c->GetAttr("dilation", &dilation));
      si::DimensionHandle length, width;
      TF_RETURN_IF_ERROR(c->Add(c->Dim(in, 1), dilation, &length));
      TF_RETURN_IF_ERROR(c->Divide(c->Dim(in, 2), 2, true, &width));
      c->set_output(0, c->MakeShape({c->Dim(in, 0), length, width}));
      return tensorflow::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("DwaveGate").Device(DEVICE_CPU), GateOp);
REGISTER_KERNEL_BUILDER(Name("DwaveGateGrad").Device(DEVICE_CPU), GateGradOp);
#define REGISTER_PAIRS(T)                                                                   \
  REGISTER_KERNEL_BUILDER(Name("DwavePairs").Device(DEVICE_CPU).TypeConstraint<T>("T"),    \
                          PairsOp<T>);                                                      \
  REGISTER_KERNEL_BUILDER(Name("DwavePairsGrad").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
                          PairsGradOp<T>);
REGISTER_PAIRS(float)
REGISTER_PAIRS(tensorflow::bfloat16)
