// Paged attention of each sequence's last row (a decode) on the CPU: an XLA FFI custom call
// (cpu_kernels/decode_attention.py is its jitted wrapper and reference).
//
// It reads exactly the keys a row attends to, page by page, straight from the stacked pools:
// XLA's own path gathers whole key blocks into a transposed copy and runs many small ops per
// layer, about 6x the time of reading the KV once (SmolLM2 shapes, 2-core CPU).
//
//   q          [S, H, D]            f32  each sequence's last row (H = K * G query heads)
//   k_pool     [L, P, PS, K, D]     f32  stacked pools (layers, pages, page rows, kv heads)
//   v_pool     [L, P, PS, K, D]     f32
//   layer      []                   i32
//   page_table [S, W]               i32  a sequence's pages in order
//   kv_lens    [S]                  i32  keys of each sequence; the row is at kv_len - 1
//   out        [S, H, D]            f32  0 for a sequence with no keys
//   attrs: sm_scale (f32), window (i64; 0: none, else a row sees positions > its own - window)
//
// Work items are (sequence, kv head) pairs, spread over XLA's intra-op thread pool; each keeps
// a running max, sum and output per query head of its group (online softmax over pages).
// Bad indices never read outside the pools: a page id outside [0, P) contributes no keys, and
// kv_len is clipped to [0, W * PS].
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kMaskValue = -1e30f;   // finite: the build assumes finite math

template <typename A, typename B>
bool SameDims(const A& a, const B& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

struct Dims {
  int64_t S, H, D, P, PS, K, G, W, L;
};

constexpr int64_t kChunk = 64;         // keys per online-softmax step (across pages)
constexpr int64_t kSplitKeys = 128;    // keys per work item (a sequence's keys are split)

// Keys [a, b) of sequence s, all heads: the partial softmax state of each query head,
// m [H], l [H] and the unnormalized output o [H, D] (flash decoding's split).
void AttendSplit(const Dims& d, const float* q, const float* k_layer, const float* v_layer,
                 const int32_t* table, float sm_scale, int64_t s, int64_t a, int64_t b,
                 float* m, float* l, float* o) {
  const int64_t H = d.H, G = d.G, D = d.D, PS = d.PS;
  const int64_t row = d.K * D;                     // one key row: every kv head
  const float* qs = q + s * H * D;                 // [H, D]
  std::fill(m, m + H, kMaskValue);
  std::fill(l, l + H, 0.f);
  std::fill(o, o + H * D, 0.f);
  float p[kChunk * 64];                            // scores [H, kChunk] (H <= 64)
  const float* k_rows[kChunk];
  const float* v_rows[kChunk];
  int64_t pos = a;
  while (pos < b) {
    int64_t c = 0;                                 // up to kChunk keys' rows
    while (pos < b && c < kChunk) {
      const int64_t r = pos % PS;
      const int64_t rows = std::min({PS - r, b - pos, kChunk - c});
      const int32_t page = table[s * d.W + pos / PS];
      if (page >= 0 && page < d.P) {               // a bad page id contributes no keys
        const int64_t at = (page * PS + r) * row;
        for (int64_t j = 0; j < rows; ++j, ++c) {
          k_rows[c] = k_layer + at + j * row;
          v_rows[c] = v_layer + at + j * row;
        }
      }
      pos += rows;
    }
    if (c == 0) continue;
    for (int64_t j = 0; j < c; ++j) {              // scores
      for (int64_t h = 0; h < H; ++h) {
        const float* kr = k_rows[j] + (h / G) * D;
        const float* qh = qs + h * D;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < D; ++i) acc += qh[i] * kr[i];
        p[h * kChunk + j] = acc * sm_scale;
      }
    }
    for (int64_t h = 0; h < H; ++h) {              // online softmax
      float* ph = p + h * kChunk;
      float block_max = kMaskValue;
      for (int64_t j = 0; j < c; ++j) block_max = std::max(block_max, ph[j]);
      const float m_new = std::max(m[h], block_max);
      const float alpha = std::exp(m[h] - m_new);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < c; ++j) {
        ph[j] = std::exp(ph[j] - m_new);
        sum += ph[j];
      }
      l[h] = l[h] * alpha + sum;
      m[h] = m_new;
      float* oh = o + h * D;
      for (int64_t i = 0; i < D; ++i) oh[i] *= alpha;
    }
    for (int64_t j = 0; j < c; ++j) {              // o += p @ v
      for (int64_t h = 0; h < H; ++h) {
        const float* vr = v_rows[j] + (h / G) * D;
        const float pj = p[h * kChunk + j];
        float* oh = o + h * D;
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) oh[i] += pj * vr[i];
      }
    }
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                           ffi::Buffer<ffi::F32> k_pool, ffi::Buffer<ffi::F32> v_pool,
                           ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> page_table,
                           ffi::Buffer<ffi::S32> kv_lens, ffi::ResultBuffer<ffi::F32> out,
                           float sm_scale, int64_t window) {
  auto qd = q.dimensions(), kd = k_pool.dimensions(), td = page_table.dimensions();
  if (qd.size() != 3 || kd.size() != 5 || td.size() != 2 || kv_lens.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("decode_attention: q, pools, page_table, kv_lens ranks");
  Dims d{qd[0], qd[1], qd[2], kd[1], kd[2], kd[3], 0, td[1], kd[0]};
  if (d.K <= 0 || d.H % d.K != 0 || d.H > 64 || kd[4] != d.D || td[0] != d.S ||
      kv_lens.dimensions()[0] != d.S || !SameDims(v_pool.dimensions(), kd))
    return ffi::Error::InvalidArgument("decode_attention: shapes do not agree");
  d.G = d.H / d.K;
  const int64_t lyr = layer.typed_data()[0];
  if (lyr < 0 || lyr >= d.L) return ffi::Error::InvalidArgument("decode_attention: layer");
  const int64_t layer_size = d.P * d.PS * d.K * d.D;
  const float* k_layer = k_pool.typed_data() + lyr * layer_size;
  const float* v_layer = v_pool.typed_data() + lyr * layer_size;
  const float* qp = q.typed_data();
  const int32_t* tp = page_table.typed_data();
  float* op = out->typed_data();
  // work items: (sequence, split of kSplitKeys keys); item_seq/item_lo list them in order
  std::vector<int64_t> lo(d.S), hi(d.S), first_item(d.S + 1, 0);
  for (int64_t s = 0; s < d.S; ++s) {
    hi[s] = std::clamp<int64_t>(kv_lens.typed_data()[s], 0, d.W * d.PS);
    lo[s] = window > 0 ? std::max<int64_t>(0, hi[s] - window) : 0;
    first_item[s + 1] = first_item[s] + (hi[s] - lo[s] + kSplitKeys - 1) / kSplitKeys;
  }
  const int64_t items = first_item[d.S];
  const int64_t H = d.H, D = d.D;
  std::vector<float> state(items * H * (D + 2));   // per item: m [H], l [H], o [H, D]
  float* st = state.data();
  pensieve::ParallelFor(pool, items, [&](int64_t i) {
    const int64_t s = std::upper_bound(first_item.begin(), first_item.end(), i) -
                      first_item.begin() - 1;
    const int64_t a = lo[s] + (i - first_item[s]) * kSplitKeys;
    float* m = st + i * H * (D + 2);
    AttendSplit(d, qp, k_layer, v_layer, tp, sm_scale, s, a, std::min(hi[s], a + kSplitKeys),
                m, m + H, m + 2 * H);
  });
  for (int64_t s = 0; s < d.S; ++s) {              // merge each sequence's splits
    for (int64_t h = 0; h < H; ++h) {
      float mx = kMaskValue;
      for (int64_t i = first_item[s]; i < first_item[s + 1]; ++i)
        mx = std::max(mx, st[i * H * (D + 2) + h]);
      float total = 0.f;
      float* out_h = op + (s * H + h) * D;
      std::fill(out_h, out_h + D, 0.f);
      for (int64_t i = first_item[s]; i < first_item[s + 1]; ++i) {
        const float* m = st + i * H * (D + 2);
        const float w = m[h] > kMaskValue ? std::exp(m[h] - mx) : 0.f;
        total += w * m[H + h];
        const float* oi = m + 2 * H + h * D;
        for (int64_t x = 0; x < D; ++x) out_h[x] += w * oi[x];
      }
      if (total > 0.f)
        for (int64_t x = 0; x < D; ++x) out_h[x] /= total;
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PensieveDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_pool
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_pool
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()   // page_table
                                  .Arg<ffi::Buffer<ffi::S32>>()   // kv_lens
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Attr<float>("sm_scale")
                                  .Attr<int64_t>("window"));
