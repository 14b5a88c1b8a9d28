// A probe, not a product kernel: an onnxruntime custom op "mtrt_probe.Q4Gemm" that computes what MatMulNBits
// (bits 4, block 32, accuracy level 4, no zero points) computes, from the same initializers, so the demo's int4
// export can be timed with an int4 kernel of our own in place of onnxruntime's (scripts/probe_int4_kernel.py).
//
// MatMulNBits' 4-bit layout: B [N, K/32, 16] uint8, block b of output column n holding element 2j in byte j's low
// nibble and 2j+1 in its high one; scales [N, K/32]; implicit zero point 8. Accuracy level 4 quantizes each block of
// 32 activations to int8 (scale max|x| / 127, round to nearest even), so a block's dot product is integer:
//   y[n] = sum_b s[n,b] * xs[b] * (sum_k q[k] * x8[k] - 8 * sum_k x8[k])
// The activations are stored in the nibbles' lane order (even elements, then odd ones) so that one 16-byte load of
// weights, a shift and a mask give 32 unsigned values lined up with their 32 int8 activations for maddubs.
// Eight blocks' integer sums are reduced together (hadd tree) so the float work is one fma per 8 blocks.
//
// mode (attribute): 0 computes; 1 writes zeros without reading the weights (a stand-in: what the step costs
// without this MatMul, dispatch kept); 2 quantizes the activations and runs an empty parallel-for (the per-call
// cost). Modes 1 and 2 take any MatMulNBits (the lm_head's 8-bit one too).
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

struct Call {
  const uint8_t* B; const float* S; const int8_t* x8; const float* xs; const float* xc; float* Y;
  int64_t M, N, nb, chunk;
};

inline __m256i dot_block(const uint8_t* q, const int8_t* a, __m256i m4, __m256i ones) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  __m256i v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), m4);  // [even | odd] elements
  __m256i a8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(v, a8), ones);  // 8 int32 partial sums
}

void columns(void* p, size_t c) {  // output columns [c * chunk, (c + 1) * chunk), every row
  const Call& g = *static_cast<const Call*>(p);
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int64_t n0 = static_cast<int64_t>(c) * g.chunk, n1 = std::min(g.N, n0 + g.chunk), nb = g.nb;
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* q = g.B + n * nb * 16;
    const float* s = g.S + n * nb;
    for (int64_t m = 0; m < g.M; m++) {
      const int8_t* a = g.x8 + m * nb * 32;
      const float* xs = g.xs + m * nb;
      const float* xc = g.xc + m * nb;
      __m256 acc = _mm256_setzero_ps(), cor = _mm256_setzero_ps();
      int64_t b = 0;
      for (; b + 8 <= nb; b += 8) {
        __m256i d[8];
        for (int i = 0; i < 8; i++) d[i] = dot_block(q + (b + i) * 16, a + (b + i) * 32, m4, ones);
        __m256i h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(d[0], d[1]), _mm256_hadd_epi32(d[2], d[3]));
        __m256i h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(d[4], d[5]), _mm256_hadd_epi32(d[6], d[7]));
        __m256i sum = _mm256_add_epi32(_mm256_permute2x128_si256(h0, h1, 0x20),
                                       _mm256_permute2x128_si256(h0, h1, 0x31));  // block b + i in lane i
        __m256 sv = _mm256_loadu_ps(s + b);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(sv, _mm256_loadu_ps(xs + b)), acc);
        cor = _mm256_fmadd_ps(sv, _mm256_loadu_ps(xc + b), cor);
      }
      __m256 r = _mm256_sub_ps(acc, cor);
      __m128 t = _mm_add_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
      t = _mm_add_ps(t, _mm_movehl_ps(t, t));
      t = _mm_add_ss(t, _mm_movehdup_ps(t));
      float y = _mm_cvtss_f32(t);
      for (; b < nb; b++) {  // the last K/32 mod 8 blocks one at a time
        __m256i d = dot_block(q + b * 16, a + b * 32, m4, ones);
        __m128i h = _mm_add_epi32(_mm256_castsi256_si128(d), _mm256_extracti128_si256(d, 1));
        h = _mm_hadd_epi32(h, h);
        h = _mm_hadd_epi32(h, h);
        y += s[b] * (xs[b] * static_cast<float>(_mm_cvtsi128_si32(h)) - xc[b]);
      }
      g.Y[m * g.N + n] = y;
    }
  }
}

struct Kernel {
  int64_t K, N, nb, mode, chunk = 16;  // 16 columns a task: measured no worse than 8-128 on the demo's shapes

  Kernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    K = ki.GetAttribute<int64_t>("K");
    N = ki.GetAttribute<int64_t>("N");
    mode = ki.GetAttribute<int64_t>("mode");
    nb = K / 32;
    if (mode == 0 && K % 32) ORT_CXX_API_THROW("Q4Gemm: K must be a multiple of 32", ORT_INVALID_ARGUMENT);
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto A = ctx.GetInput(0), B = ctx.GetInput(1), S = ctx.GetInput(2);
    auto shape = A.GetTensorTypeAndShapeInfo().GetShape();  // [..., K]
    int64_t M = 1;
    for (size_t i = 0; i + 1 < shape.size(); i++) M *= shape[i];
    shape.back() = N;
    auto Y = ctx.GetOutput(0, shape);
    float* y = Y.GetTensorMutableData<float>();
    if (mode == 1) { std::memset(y, 0, sizeof(float) * M * N); return; }
    const float* x = A.GetTensorData<float>();
    thread_local std::vector<int8_t> x8;  // per calling thread: concurrent runs of one session stay apart
    thread_local std::vector<float> xs, xc;
    x8.resize(M * nb * 32); xs.resize(M * nb); xc.resize(M * nb);
    for (int64_t m = 0; m < M; m++)
      for (int64_t b = 0; b < nb; b++) {
        const float* xb = x + m * K + b * 32;
        float amax = 0.f;
        for (int i = 0; i < 32; i++) amax = std::max(amax, std::fabs(xb[i]));
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        int8_t* o = x8.data() + (m * nb + b) * 32;
        int sum = 0;
        for (int j = 0; j < 16; j++) {
          const int lo = static_cast<int>(std::nearbyint(xb[2 * j] * inv));
          const int hi = static_cast<int>(std::nearbyint(xb[2 * j + 1] * inv));
          o[j] = static_cast<int8_t>(lo); o[16 + j] = static_cast<int8_t>(hi); sum += lo + hi;
        }
        xs[m * nb + b] = amax / 127.f;
        xc[m * nb + b] = 8.f * xs[m * nb + b] * static_cast<float>(sum);
      }
    Call g{B.GetTensorData<uint8_t>(), S.GetTensorData<float>(), x8.data(), xs.data(), xc.data(), y, M, N, nb, chunk};
    const size_t tasks = static_cast<size_t>((N + chunk - 1) / chunk);
    if (mode == 2) { ctx.ParallelFor([](void*, size_t) {}, tasks, 0, &g); return; }
    ctx.ParallelFor(columns, tasks, 0, &g);  // onnxruntime's intra-op pool: no second set of spinning threads
  }
};

struct Op : Ort::CustomOpBase<Op, Kernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new Kernel(api, info); }
  const char* GetName() const { return "Q4Gemm"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

Op op;

}  // namespace

extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api) {
  Ort::InitApi(api->GetApi(ORT_API_VERSION));
  static Ort::CustomOpDomain domain("mtrt_probe");
  domain.Add(&op);
  Ort::UnownedSessionOptions(options).Add(domain);
  return nullptr;
}
