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
//   DwaveGate(fg, b) -> z                z = tanh(f + b_f) * sigmoid(g + b_g), fg = [f | g] on
//                                        the last axis: the conv's product, its bias added here
//   DwaveGateGrad(fg, b, dz) -> dfg, db  its gradient, tanh and sigmoid recomputed from fg
//   DwavePairs(h, dilation) -> x         x[:, t] = [h[:, t] | h[:, t + d]], t < L - d
//   DwavePairsGrad(dx, dilation) -> dh   its gradient
//   DwaveResidual(now, r, b) -> out      out = now + r + b: the residual sum after a layer
//   DwaveResidualGrad(dout) -> dr, db    its gradient (d now is d out)
//
// Each converts between the products' type (bfloat16 under --precision bf16) and float32 as it
// goes, so a bf16 step has no separate casts (and no separate bias pass) around its products.
//
// sigmoid(g) is computed as 0.5 + 0.5 tanh(g / 2): one vectorised tanh (Eigen's rational
// approximation, the one TensorFlow's Tanh uses) serves both halves, where TensorFlow's own
// Sigmoid took 2.2x the time of its Tanh. Results match TensorFlow's ops to ~1e-6
// (tests/test_fused_ops.py).

#include <algorithm>
#include <cstring>
#include <map>

#include "tensorflow/core/framework/bfloat16.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/mutex.h"
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

// A row of n values as float (an aligned scratch row: Eigen's unaligned maps ran the gradient
// 2.6x slower), and back: the products may run in bfloat16, the gate's arithmetic is float32.
// bfloat16 <-> float by the bits (the upper half of a float; rounding to nearest even, NaN kept
// a NaN), in loops the compiler vectorises: Eigen's per-value conversion made the bf16 gate
// 6x slower than the float32 one.
using tensorflow::bfloat16;
static_assert(sizeof(bfloat16) == 2, "bfloat16 is 16 bits");

void Convert(const float* in, float* out, int64_t n) { std::memcpy(out, in, n * sizeof(float)); }
void Convert(const bfloat16* in, bfloat16* out, int64_t n) {
  std::memcpy(out, in, n * sizeof(bfloat16));
}
void Convert(const bfloat16* in, float* out, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(in);
  uint32_t* wide = reinterpret_cast<uint32_t*>(out);
  for (int64_t j = 0; j < n; ++j) wide[j] = static_cast<uint32_t>(bits[j]) << 16;
}
void Convert(const float* in, bfloat16* out, int64_t n) {
  const uint32_t* wide = reinterpret_cast<const uint32_t*>(in);
  uint16_t* bits = reinterpret_cast<uint16_t*>(out);
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t u = wide[j];
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    bits[j] = nan ? 0x7fc0 : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
}
template <typename T>
void Load(const T* in, Eigen::ArrayXf& out, int64_t n) { Convert(in, out.data(), n); }
template <typename T>
void Store(const Eigen::ArrayXf& in, T* out, int64_t n) { Convert(in.data(), out, n); }

// ForRows for a kernel that also sums its rows (a bias's gradient): work(begin, end, sum)
// handles rows [begin, end) and adds them into `sum` (width floats, zeroed); `total` is set to
// the shards' sums added in row order afterwards (zeros for no rows), so a run gives the same
// bits every time (in the order the threads finish, the last bits vary).
template <typename Work>
void ForRowsSummed(OpKernelContext* ctx, int64_t rows, int64_t cost, int64_t width,
                   float* total, Work work) {
  tensorflow::mutex lock;
  std::map<int64_t, Eigen::ArrayXf> partial_sums;  // first row of a shard -> its sum
  ForRows(ctx, rows, cost, [&](int64_t begin, int64_t end) {
    Eigen::ArrayXf sum = Eigen::ArrayXf::Zero(width);
    work(begin, end, sum);
    tensorflow::mutex_lock hold(lock);
    partial_sums.emplace(begin, std::move(sum));
  });
  Row all(total, width);
  all.setZero();
  for (const auto& shard : partial_sums) all += shard.second;
}

// ---------------------------------------------------------------------------------------------
// The gated unit, its bias added: z = tanh(f + b_f) * sigmoid(g + b_g).

template <typename Tin, typename Tout>
class GateOp : public OpKernel {
 public:
  explicit GateOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& fg = ctx->input(0);
    const Tensor& bias = ctx->input(1);
    OP_REQUIRES(ctx, fg.dims() >= 1 && fg.dim_size(fg.dims() - 1) % 2 == 0,
                InvalidArgument("DwaveGate: the last axis must hold [filter | gate]"));
    const int64_t width = fg.dim_size(fg.dims() - 1), d = width / 2;
    OP_REQUIRES(ctx, bias.dims() == 1 && bias.dim_size(0) == width,
                InvalidArgument("DwaveGate: the bias must have ", width, " values"));
    TensorShape shape = fg.shape();
    shape.set_dim(fg.dims() - 1, d);
    Tensor* z = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &z));
    if (d == 0 || z->NumElements() == 0) return;
    const Tin* in = fg.flat<Tin>().data();
    const float* b = bias.flat<float>().data();
    Tout* out = z->flat<Tout>().data();
    ForRows(ctx, z->NumElements() / d, 40 * d, [=](int64_t begin, int64_t end) {
      ConstRow bf(b, d), bg(b + d, d);
      Eigen::ArrayXf row(width), result(d);
      for (int64_t r = begin; r < end; ++r) {
        Load(in + r * width, row, width);
        result = (row.head(d) + bf).tanh() * (0.5f + 0.5f * (0.5f * (row.tail(d) + bg)).tanh());
        Store(result, out + r * d, d);
      }
    });
  }
};

// d fg = [dz s (1 - t^2) | dz t s (1 - s)], t = tanh(f + b_f), s = sigmoid(g + b_g) recomputed;
// d bias = d fg summed over the rows (in float32).
template <typename Tin, typename Tout>
class GateGradOp : public OpKernel {
 public:
  explicit GateGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& fg = ctx->input(0);
    const Tensor& bias = ctx->input(1);
    const Tensor& dz = ctx->input(2);
    const int64_t width = fg.dim_size(fg.dims() - 1), d = width / 2;
    OP_REQUIRES(ctx, dz.NumElements() * 2 == fg.NumElements(),
                InvalidArgument("DwaveGateGrad: dz must have half of fg's elements"));
    Tensor *dfg = nullptr, *dbias = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, fg.shape(), &dfg));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, bias.shape(), &dbias));
    if (d == 0) return;
    float* db = dbias->flat<float>().data();
    const Tin* in = fg.flat<Tin>().data();
    const float* b = bias.flat<float>().data();
    const Tout* grad = dz.flat<Tout>().data();
    Tin* out = dfg->flat<Tin>().data();
    auto work = [=](int64_t begin, int64_t end, Eigen::ArrayXf& sum) {
      ConstRow bf(b, d), bg(b + d, d);
      Eigen::ArrayXf row(width), g(d), t(d), s(d), dfg_row(width);
      for (int64_t r = begin; r < end; ++r) {
        Load(in + r * width, row, width);
        Load(grad + r * d, g, d);
        t = (row.head(d) + bf).tanh();
        s = 0.5f + 0.5f * (0.5f * (row.tail(d) + bg)).tanh();
        dfg_row.head(d) = g * s * (1.0f - t * t);
        dfg_row.tail(d) = g * t * s * (1.0f - s);
        sum += dfg_row;
        Store(dfg_row, out + r * width, width);
      }
    };
    ForRowsSummed(ctx, fg.NumElements() / width, 70 * d, width, db, work);
  }
};

// ---------------------------------------------------------------------------------------------
// The kernel-2 dilated conv's input: each position's [past | now] pair, for a valid conv, in
// the products' type.

class DilatedOp : public OpKernel {
 public:
  explicit DilatedOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dilation", &dilation_));
  }

 protected:
  int dilation_;
};

template <typename Tin, typename Tout>
class PairsOp : public DilatedOp {
 public:
  using DilatedOp::DilatedOp;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& h = ctx->input(0);
    OP_REQUIRES(ctx, h.dims() == 3,
                InvalidArgument("DwavePairs: h must be (batch, time, channels)"));
    const int64_t batch = h.dim_size(0), length = h.dim_size(1), c = h.dim_size(2);
    OP_REQUIRES(ctx, dilation_ >= 0 && dilation_ < length,
                InvalidArgument("DwavePairs: dilation ", dilation_, " needs more than ", dilation_,
                                " positions, got ", length));
    const int64_t out_len = length - dilation_, d = dilation_;
    Tensor* x = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({batch, out_len, 2 * c}), &x));
    if (x->NumElements() == 0) return;
    const Tin* in = h.flat<Tin>().data();
    Tout* out = x->flat<Tout>().data();
    ForRows(ctx, batch * out_len, 2 * c, [=](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / out_len, t = r % out_len;
        const Tin* past = in + (b * length + t) * c;
        Convert(past, out + r * 2 * c, c);
        Convert(past + d * c, out + r * 2 * c + c, c);
      }
    });
  }
};

// dh[t] = dx[t, past half] (t < L - d) + dx[t - d, now half] (t >= d), summed in float32.
template <typename Tin, typename Tout>
class PairsGradOp : public DilatedOp {
 public:
  using DilatedOp::DilatedOp;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dx = ctx->input(0);
    OP_REQUIRES(ctx, dx.dims() == 3 && dx.dim_size(2) % 2 == 0,
                InvalidArgument("DwavePairsGrad: dx must be (batch, time, 2 * channels)"));
    const int64_t batch = dx.dim_size(0), out_len = dx.dim_size(1), c = dx.dim_size(2) / 2;
    const int64_t d = dilation_, length = out_len + d;
    Tensor* dh = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({batch, length, c}), &dh));
    if (dh->NumElements() == 0) return;
    const Tout* in = dx.flat<Tout>().data();
    Tin* out = dh->flat<Tin>().data();
    ForRows(ctx, batch * length, 2 * c, [=](int64_t begin, int64_t end) {
      Eigen::ArrayXf past(c), now(c);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / length, t = r % length;
        Tin* row = out + r * c;
        const Tout* as_past = t < out_len ? in + (b * out_len + t) * 2 * c : nullptr;
        const Tout* as_now = t >= d ? in + (b * out_len + t - d) * 2 * c + c : nullptr;
        if (as_past && as_now) {
          Load(as_past, past, c);
          Load(as_now, now, c);
          past += now;
          Store(past, row, c);
        } else if (as_past || as_now) {
          Convert(as_past ? as_past : as_now, row, c);
        } else {
          std::fill(row, row + c, Tin(0.0f));
        }
      }
    });
  }
};

// ---------------------------------------------------------------------------------------------
// The residual sum after a layer: out = now + r + b, r the residual 1x1's product (bfloat16
// under --precision bf16), where TensorFlow ran a Cast, a BiasAdd and an AddV2.

template <typename Tr>
class ResidualOp : public OpKernel {
 public:
  explicit ResidualOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& now = ctx->input(0);
    const Tensor& r = ctx->input(1);
    const Tensor& bias = ctx->input(2);
    OP_REQUIRES(ctx, now.shape() == r.shape() && now.dims() >= 1,
                InvalidArgument("DwaveResidual: now and r must have one shape"));
    const int64_t c = now.dim_size(now.dims() - 1);
    OP_REQUIRES(ctx, bias.dims() == 1 && bias.dim_size(0) == c,
                InvalidArgument("DwaveResidual: the bias must have ", c, " values"));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, now.shape(), &out));
    if (out->NumElements() == 0) return;
    const float* in = now.flat<float>().data();
    const Tr* product = r.flat<Tr>().data();
    const float* b = bias.flat<float>().data();
    float* sum = out->flat<float>().data();
    ForRows(ctx, out->NumElements() / c, 3 * c, [=](int64_t begin, int64_t end) {
      ConstRow br(b, c);
      Eigen::ArrayXf row(c);
      for (int64_t i = begin; i < end; ++i) {
        Load(product + i * c, row, c);
        Row(sum + i * c, c) = ConstRow(in + i * c, c) + row + br;
      }
    });
  }
};

// d now = d out (the gradient function passes it on), d r = d out in r's type, d bias = d out
// summed over the rows.
template <typename Tr>
class ResidualGradOp : public OpKernel {
 public:
  explicit ResidualGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dout = ctx->input(0);
    OP_REQUIRES(ctx, dout.dims() >= 1, InvalidArgument("DwaveResidualGrad: a tensor of rows"));
    const int64_t c = dout.dim_size(dout.dims() - 1);
    Tensor *dr = nullptr, *dbias = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, dout.shape(), &dr));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({c}), &dbias));
    if (c == 0) return;
    float* db = dbias->flat<float>().data();
    const float* in = dout.flat<float>().data();
    Tr* out = dr->flat<Tr>().data();
    auto work = [=](int64_t begin, int64_t end, Eigen::ArrayXf& sum) {
      for (int64_t i = begin; i < end; ++i) {
        sum += ConstRow(in + i * c, c);
        Convert(in + i * c, out + i * c, c);
      }
    };
    ForRowsSummed(ctx, dout.NumElements() / c, 3 * c, c, db, work);
  }
};

}  // namespace

// Tin: the products' output (gate) or the residual stream (pairs); Tout: what the next
// products read. float32 throughout for fp32; bfloat16 products read and write bfloat16.
REGISTER_OP("DwaveGate")
    .Input("fg: Tin")
    .Input("bias: float")
    .Output("z: Tout")
    .Attr("Tin: {float, bfloat16}")
    .Attr("Tout: {float, bfloat16} = DT_FLOAT")
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
    .Input("fg: Tin")
    .Input("bias: float")
    .Input("dz: Tout")
    .Output("dfg: Tin")
    .Output("dbias: float")
    .Attr("Tin: {float, bfloat16}")
    .Attr("Tout: {float, bfloat16} = DT_FLOAT")
    .SetShapeFn([](si::InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(1));
      return tensorflow::OkStatus();
    });

// (batch, L, C) -> (batch, L - d, 2C) forward; (batch, L - d, 2C) -> (batch, L, C) backward.
tensorflow::Status PairsShape(si::InferenceContext* c, bool forward) {
  si::ShapeHandle in;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &in));
  int dilation;
  TF_RETURN_IF_ERROR(c->GetAttr("dilation", &dilation));
  si::DimensionHandle length, width;
  if (forward) {
    TF_RETURN_IF_ERROR(c->Subtract(c->Dim(in, 1), dilation, &length));
    TF_RETURN_IF_ERROR(c->Multiply(c->Dim(in, 2), 2, &width));
  } else {
    TF_RETURN_IF_ERROR(c->Add(c->Dim(in, 1), dilation, &length));
    TF_RETURN_IF_ERROR(c->Divide(c->Dim(in, 2), 2, true, &width));
  }
  c->set_output(0, c->MakeShape({c->Dim(in, 0), length, width}));
  return tensorflow::OkStatus();
}

REGISTER_OP("DwavePairs")
    .Input("h: Tin")
    .Output("x: Tout")
    .Attr("Tin: {float, bfloat16}")
    .Attr("Tout: {float, bfloat16} = DT_FLOAT")
    .Attr("dilation: int >= 0")
    .SetShapeFn([](si::InferenceContext* c) { return PairsShape(c, true); });

REGISTER_OP("DwavePairsGrad")
    .Input("dx: Tout")
    .Output("dh: Tin")
    .Attr("Tin: {float, bfloat16}")
    .Attr("Tout: {float, bfloat16} = DT_FLOAT")
    .Attr("dilation: int >= 0")
    .SetShapeFn([](si::InferenceContext* c) { return PairsShape(c, false); });

REGISTER_OP("DwaveResidual")
    .Input("now: float")
    .Input("r: Tr")
    .Input("bias: float")
    .Output("out: float")
    .Attr("Tr: {float, bfloat16}")
    .SetShapeFn([](si::InferenceContext* c) {
      c->set_output(0, c->input(0));
      return tensorflow::OkStatus();
    });

REGISTER_OP("DwaveResidualGrad")
    .Input("dout: float")
    .Output("dr: Tr")
    .Output("dbias: float")
    .Attr("Tr: {float, bfloat16}")
    .SetShapeFn([](si::InferenceContext* c) {
      si::ShapeHandle in;
      TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 1, &in));
      c->set_output(0, in);
      c->set_output(1, c->Vector(c->Dim(in, -1)));
      return tensorflow::OkStatus();
    });

#define REGISTER_KERNELS(NAME, OP, TIN, TOUT)                                              \
  REGISTER_KERNEL_BUILDER(                                                                 \
      Name(NAME).Device(DEVICE_CPU).TypeConstraint<TIN>("Tin").TypeConstraint<TOUT>("Tout"), \
      OP<TIN, TOUT>);
#define REGISTER_ALL(TIN, TOUT)                            \
  REGISTER_KERNELS("DwaveGate", GateOp, TIN, TOUT)         \
  REGISTER_KERNELS("DwaveGateGrad", GateGradOp, TIN, TOUT) \
  REGISTER_KERNELS("DwavePairs", PairsOp, TIN, TOUT)       \
  REGISTER_KERNELS("DwavePairsGrad", PairsGradOp, TIN, TOUT)
REGISTER_ALL(float, float)
REGISTER_ALL(float, tensorflow::bfloat16)
REGISTER_ALL(tensorflow::bfloat16, tensorflow::bfloat16)
REGISTER_ALL(tensorflow::bfloat16, float)
#define REGISTER_RESIDUAL(TR)                                                                  \
  REGISTER_KERNEL_BUILDER(Name("DwaveResidual").Device(DEVICE_CPU).TypeConstraint<TR>("Tr"),    \
                          ResidualOp<TR>);                                                     \
  REGISTER_KERNEL_BUILDER(Name("DwaveResidualGrad").Device(DEVICE_CPU).TypeConstraint<TR>("Tr"), \
                          ResidualGradOp<TR>);
REGISTER_RESIDUAL(float)
REGISTER_RESIDUAL(tensorflow::bfloat16)
