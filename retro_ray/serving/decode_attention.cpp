// Decode attention on the CPU: every decode row's query heads over its own keys, read where they
// live in the engine's cache, in one call per layer (kernels.py builds it; memory.KVCache calls it).
//
// Per-row SDPA costs a dispatch per row and layer, and reads the keys at a fraction of the
// memory's speed. Here one task is one row's one key head: its g query heads share every key and
// value they read. The keys are stored in blocks of W positions, each block [e, W] (a key head's
// cache is [N / W, e, W]), so the scores of W keys are W-wide multiply-adds over one contiguous
// 4 KB block (e = 64) with the g accumulators in registers; the values stay [N, e], each row read
// once for the g heads, e / W accumulators per head in registers.
//
// Notation as memory.py: b decode rows, h_kv key heads, g query heads per key head, e head width,
// N cache positions, n keys a row sees, W lanes.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t W = 16;
typedef float lanes __attribute__((vector_size(W * sizeof(float))));

inline lanes load(const float* p) {
  lanes x;
  std::memcpy(&x, p, sizeof(lanes));
  return x;
}

inline void store(float* p, lanes x) { std::memcpy(p, &x, sizeof(lanes)); }

// One row's G query heads q [G, e] (scaled) over keys first .. first + n - 1 of one key head:
// blocked keys kb [N / W, e, W], values v [N, e] -> out [G, e]. p: room for G (n + 2 W) scores.
template <int G, int V>
void one_head(const float* q, const float* kb, const float* v, int64_t first, int64_t n, float* p, float* out) {
  constexpr int64_t e = V * W;
  const int64_t b0 = first / W, b1 = (first + n + W - 1) / W, skip = first - b0 * W, span = (b1 - b0) * W;
  // scores [G, span]: whole blocks, the keys before first and after its last one computed and unread
  for (int64_t blk = b0; blk < b1; ++blk) {
    const float* k = kb + blk * e * W;
    lanes acc[G] = {};
    for (int64_t d = 0; d < e; ++d) {
      const lanes x = load(k + d * W);
      for (int g = 0; g < G; ++g) acc[g] += q[g * e + d] * x;
    }
    for (int g = 0; g < G; ++g) store(p + g * span + (blk - b0) * W, acc[g]);
  }
  float total[G];
  for (int g = 0; g < G; ++g) {
    float* s = p + g * span + skip;
    float top = s[0];
    for (int64_t j = 1; j < n; ++j) top = std::max(top, s[j]);
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      s[j] = std::exp(s[j] - top);
      sum += s[j];
    }
    total[g] = 1.f / sum;
  }
  lanes acc[G][V] = {};
  for (int64_t j = 0; j < n; ++j) {
    const float* row = v + (first + j) * e;
    for (int g = 0; g < G; ++g) {
      const float w = p[g * span + skip + j];
      for (int c = 0; c < V; ++c) acc[g][c] += w * load(row + c * W);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < V; ++c) store(out + g * e + c * W, acc[g][c] * total[g]);
}

template <int G, int V>
void rows(const at::Tensor& q, const at::Tensor& kb, const at::Tensor& v, const at::Tensor& lo,
          const at::Tensor& hi, double scale, at::Tensor& out) {
  constexpr int64_t e = V * W;
  const int64_t h_kv = kb.size(0), N = v.size(1);
  const float *qs = q.data_ptr<float>(), *ks = kb.data_ptr<float>(), *vs = v.data_ptr<float>();
  const int64_t *los = lo.data_ptr<int64_t>(), *his = hi.data_ptr<int64_t>();
  float* os = out.data_ptr<float>();
  at::parallel_for(0, q.size(0) * h_kv, 1, [&](int64_t begin, int64_t end) {
    float scaled[G * e];
    std::vector<float> p;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / h_kv, h = t % h_kv, n = his[b] - los[b];
      for (int64_t i = 0; i < G * e; ++i) scaled[i] = qs[t * G * e + i] * static_cast<float>(scale);
      p.resize(G * (n + 2 * W));
      one_head<G, V>(scaled, ks + h * N * e, vs + h * N * e, los[b], n, p.data(), os + t * G * e);
    }
  });
}

template <int V, int G = 1>
void by_heads(int64_t g, const at::Tensor& q, const at::Tensor& kb, const at::Tensor& v, const at::Tensor& lo,
              const at::Tensor& hi, double scale, at::Tensor& out) {
  if constexpr (G > 8) {
    TORCH_CHECK(false, "decode_attention: ", g, " query heads per key head (at most 8)");
  } else if (g == G) {
    rows<G, V>(q, kb, v, lo, hi, scale, out);
  } else {
    by_heads<V, G + 1>(g, q, kb, v, lo, hi, scale, out);
  }
}

// q [b, h_kv, g, e], kb [h_kv, N / W, e, W], v [h_kv, N, e], lo, hi [b] (row i sees keys lo[i] .. hi[i] - 1)
// -> [b, h_kv, g, e]
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& kb, const at::Tensor& v, const at::Tensor& lo,
                            const at::Tensor& hi, double scale) {
  TORCH_CHECK(q.dim() == 4 && kb.dim() == 4 && v.dim() == 3, "decode_attention: q [b, h_kv, g, e], "
              "kb [h_kv, N / W, e, W], v [h_kv, N, e]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && kb.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "decode_attention: float32 only");
  TORCH_CHECK(q.is_contiguous() && kb.is_contiguous() && v.is_contiguous(), "decode_attention: contiguous inputs");
  const int64_t b = q.size(0), h_kv = q.size(1), e = q.size(3), N = v.size(1);
  TORCH_CHECK(kb.size(0) == h_kv && kb.size(1) * W == N && kb.size(2) == e && kb.size(3) == W &&
              v.size(0) == h_kv && v.size(2) == e, "decode_attention: the keys' and values' shapes disagree");
  TORCH_CHECK(lo.scalar_type() == at::kLong && hi.scalar_type() == at::kLong && lo.numel() == b && hi.numel() == b &&
              lo.is_contiguous() && hi.is_contiguous(), "decode_attention: lo, hi: int64 [b]");
  const int64_t *los = lo.data_ptr<int64_t>(), *his = hi.data_ptr<int64_t>();
  for (int64_t i = 0; i < b; ++i)
    TORCH_CHECK(0 <= los[i] && los[i] < his[i] && his[i] <= N, "decode_attention: row ", i, " sees keys ", los[i],
                " .. ", his[i], " of ", N);
  auto out = at::empty_like(q);
  switch (e) {
    case 32: by_heads<2>(q.size(2), q, kb, v, lo, hi, scale, out); break;
    case 64: by_heads<4>(q.size(2), q, kb, v, lo, hi, scale, out); break;
    case 128: by_heads<8>(q.size(2), q, kb, v, lo, hi, scale, out); break;
    default: TORCH_CHECK(false, "decode_attention: head width ", e, " (32, 64 or 128)");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(retro_ray, m) {
  m.def("decode_attention(Tensor q, Tensor kb, Tensor v, Tensor lo, Tensor hi, float scale) -> Tensor",
        &decode_attention);
}
