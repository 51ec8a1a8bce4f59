// Decode attention over packed kvmix pages on CPU: one query row per request, every query head of a KV head
// together.  Reads the packed codes once (no dequantized copy).
//
// Codes are unpacked plane by plane: a byte holds 8 / bits codes, code j of byte i being channel i * per + j, and
// plane j is (byte >> bits * j) & mask over all bytes of a token -- a loop the compiler vectorizes.  Query and
// output live in the same plane-major channel order, so no shuffle is needed per token; the output is put back in
// channel order once per row.  Scores: (q * k_scale) . codes + q . k_min per page (keys: scale and minimum per
// channel); values: code * scale + min per token and channel group, the minima summed apart.  Online softmax per
// page.  Built at first use by torch.utils.cpp_extension (vllm_kvmix/cpu_kernel.py); tested against the reference.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__F16C__)
#include <immintrin.h>
#endif
#include <limits>
#include <vector>

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);  // one instruction; c10::Half converts in software
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

// sixteen floats in registers (GCC / Clang vector extension: one AVX-512 register, two AVX2 or four NEON ones)
constexpr int64_t kLanes = 8;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }

// exp(x) for x <= 0 (NaN-free inputs; -inf and anything below float's range give 0): 2^n * e^r, |r| <= ln2 / 2,
// e^r by its degree-6 Taylor polynomial (relative error below 2e-7)
inline Vec exp_le0(Vec x) {
  typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));
  const Vec lo = x < -87.0f ? Vec{} + 1.0f : Vec{};  // 1 where the result underflows (or x is -inf)
  x = x < -87.0f ? Vec{} - 87.0f : x;
  const Vec n = __builtin_convertvector(__builtin_convertvector(x * 1.44269504f - 0.5f, IVec), Vec);  // round
  const Vec r = (x - n * 0.693145752f) - n * 1.42860677e-06f;  // ln 2 in two parts
  Vec e = Vec{} + 1.0f / 720;
  e = e * r + 1.0f / 120;
  e = e * r + 1.0f / 24;
  e = e * r + 1.0f / 6;
  e = e * r + 0.5f;
  e = e * r + 1.0f;
  e = e * r + 1.0f;
  IVec bits;
  std::memcpy(&bits, &e, sizeof(e));
  bits += (__builtin_convertvector(n, IVec) << 23);  // times 2^n
  std::memcpy(&e, &bits, sizeof(e));
  return lo > 0.5f ? Vec{} : e;
}

// plane-major index of channel c: (c % per) * (D / per) + c / per
inline int64_t plane_index(int64_t c, int64_t per, int64_t n) { return (c % per) * n + c / per; }

// the codes of one token times their channel group's scale: plane j, group k is out[j * bytes + k * span ...]
inline void unpack_scaled(const uint8_t* __restrict row, int64_t bits, int64_t bytes, int64_t span,
                          const float* __restrict scales, float* __restrict out) {
  const int64_t per = 8 / bits;
  const int mask = (1 << bits) - 1;
  for (int64_t j = 0; j < per; ++j) {
    const int shift = static_cast<int>(bits * j);
    for (int64_t k = 0; k * span < bytes; ++k) {
      const float sc = scales[k];
      const uint8_t* __restrict r = row + k * span;
      float* __restrict o = out + j * bytes + k * span;
      for (int64_t i = 0; i < span; ++i) o[i] = static_cast<float>((r[i] >> shift) & mask) * sc;
    }
  }
}

// the codes of one token, ``bytes`` bytes at ``bits`` bits per code, as floats in plane-major order
inline void unpack_planes(const uint8_t* __restrict row, int64_t bits, int64_t bytes, float* __restrict out) {
  const int64_t per = 8 / bits;
  const int mask = (1 << bits) - 1;
  for (int64_t j = 0; j < per; ++j) {
    const int shift = static_cast<int>(bits * j);
    float* __restrict o = out + j * bytes;
    for (int64_t i = 0; i < bytes; ++i) o[i] = static_cast<float>((row[i] >> shift) & mask);
  }
}

inline float hsum(Vec v) {
  float s = 0.f;
  for (int64_t i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// a . b over n floats, n a multiple of 4 * kLanes (head sizes are multiples of 64): four independent accumulators
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  Vec r0 = {}, r1 = {}, r2 = {}, r3 = {};
  for (int64_t i = 0; i < n; i += 4 * kLanes) {
    r0 += load(a + i) * load(b + i);
    r1 += load(a + i + kLanes) * load(b + i + kLanes);
    r2 += load(a + i + 2 * kLanes) * load(b + i + 2 * kLanes);
    r3 += load(a + i + 3 * kLanes) * load(b + i + 3 * kLanes);
  }
  return hsum((r0 + r1) + (r2 + r3));
}

inline void axpy(float a, const float* __restrict x, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// One page's values for Softmax::add_tile: token t's codes (``row_bytes`` bytes from ``codes + t * row_bytes``,
// ``bits`` per code, ``span`` bytes per plane and channel group) times its groups' scales, plane-major, in
// tile[t][d]; its groups' minima in tile_min[t][groups] (meta [n][groups][2] fp16: scale, minimum).  Tokens
// not ok get zeros (their metadata may be stale).
inline void value_tile(const uint8_t* codes, int64_t bits, int64_t row_bytes, int64_t span, const uint16_t* meta,
                       int64_t groups, const char* ok, int64_t n, int64_t d, float* scl, float* tile,
                       float* tile_min) {
  for (int64_t t = 0; t < n; ++t) {
    float* row = tile + t * d;
    if (!ok[t]) {
      for (int64_t i = 0; i < d; ++i) row[i] = 0.f;
      for (int64_t j = 0; j < groups; ++j) tile_min[t * groups + j] = 0.f;
      continue;
    }
    for (int64_t j = 0; j < groups; ++j) {
      scl[j] = half_to_float(meta[(t * groups + j) * 2]);
      tile_min[t * groups + j] = half_to_float(meta[(t * groups + j) * 2 + 1]);
    }
    unpack_scaled(codes + t * row_bytes, bits, row_bytes, span, scl, row);
  }
}

// per query head: running max, sum, output accumulator [g][D] (plane-major codes times scales) and the summed
// value minima [g][groups]
struct Softmax {
  int64_t g, d, groups;
  std::vector<float> m, l, acc, acc_min;
  Softmax(int64_t g_, int64_t d_, int64_t groups_)
      : g(g_), d(d_), groups(groups_), m(g_, kNegInf), l(g_, 0.f), acc(g_ * d_, 0.f), acc_min(g_ * groups_, 0.f) {}

  // scores s[g][n] of tokens with ok[t] -> probabilities in place (0 where not ok); rescales the running state
  void probabilities(int64_t n, float* s, const char* ok) {
    for (int64_t qi = 0; qi < g; ++qi) {
      float* row = s + qi * n;
      for (int64_t t = 0; t < n; ++t) row[t] = ok[t] ? row[t] : kNegInf;
      float mx = kNegInf;
      for (int64_t t = 0; t < n; ++t) mx = std::max(mx, row[t]);
      if (mx == kNegInf) {
        for (int64_t t = 0; t < n; ++t) row[t] = 0.f;
        continue;
      }
      const float m_new = std::max(m[qi], mx);
      const float alpha = std::exp(m[qi] - m_new);  // 0 when m was -inf
      l[qi] *= alpha;
      for (int64_t i = 0; i < d; ++i) acc[qi * d + i] *= alpha;
      for (int64_t j = 0; j < groups; ++j) acc_min[qi * groups + j] *= alpha;
      m[qi] = m_new;
      for (int64_t t = 0; t < n; ++t) row[t] -= m_new;
      Vec sum = {};
      for (int64_t t = 0; t < n; t += kLanes) {  // n: a multiple of kLanes
        const Vec e = exp_le0(load(row + t));
        store(row + t, e);
        sum += e;
      }
      for (int64_t i = 0; i < kLanes; ++i) l[qi] += sum[i];
    }
  }

  // add n tokens' values: tile[n][d] (plane-major codes times their group's scale, 0 for tokens not used) and
  // minima mn[n][groups], weighted by probabilities s[g][n].  kLanes channels at a time in registers.
  void add_tile(int64_t n, const float* s, const float* tile, const float* mn) {
    for (int64_t qi = 0; qi < g; ++qi) {
      const float* p = s + qi * n;
      for (int64_t c0 = 0; c0 < d; c0 += 4 * kLanes) {  // four independent accumulators (d: a multiple of 64)
        float* a = &acc[qi * d + c0];
        Vec r0 = load(a), r1 = load(a + kLanes), r2 = load(a + 2 * kLanes), r3 = load(a + 3 * kLanes);
        for (int64_t t = 0; t < n; ++t) {
          const float pt = p[t];
          const float* x = tile + t * d + c0;
          r0 += pt * load(x);
          r1 += pt * load(x + kLanes);
          r2 += pt * load(x + 2 * kLanes);
          r3 += pt * load(x + 3 * kLanes);
        }
        store(a, r0);
        store(a + kLanes, r1);
        store(a + 2 * kLanes, r2);
        store(a + 3 * kLanes, r3);
      }
      for (int64_t j = 0; j < groups; ++j) {
        float m0 = 0.f;
        for (int64_t t = 0; t < n; ++t) m0 += p[t] * mn[t * groups + j];
        acc_min[qi * groups + j] += m0;
      }
    }
  }
};

}  // namespace

// One instantiation per head size and (key, value) bits: with the sizes known the compiler unrolls the token
// loops (about 40% faster than with run-time sizes).
template <int64_t D, int64_t k_bits, int64_t v_bits>
torch::Tensor decode_sized(torch::Tensor q, torch::Tensor cache, torch::Tensor pages, torch::Tensor num_pages,
                           torch::Tensor first_pos, torch::Tensor stage, torch::Tensor slots, torch::Tensor own_len,
                           torch::Tensor q_pos, int64_t k_codes, int64_t k_meta, int64_t v_codes, int64_t v_meta,
                           int64_t s_k_codes, int64_t s_k_meta, int64_t s_v_codes, int64_t s_v_meta, double scale,
                           int64_t window, double soft_cap) {
  // tokens per page; channel groups of staged keys, staged values and packed values
  constexpr int64_t P = 64, SKG = 16, SG = 64, v_group = 64;
  const int64_t B = q.size(0), Hq = q.size(1);
  const int64_t H = cache.size(1), page_bytes = cache.size(2), W = pages.size(1), stage_bytes = stage.size(2);
  const int64_t g = Hq / H;
  constexpr int64_t k_per = 8 / k_bits, v_per = 8 / v_bits;
  constexpr int64_t k_row = D / k_per, v_row = D / v_per;  // bytes per token
  constexpr int64_t v_groups = D / v_group, s_groups = D / SG, sk_groups = D / SKG;
  auto out = torch::zeros_like(q);
  const float* qp = q.data_ptr<float>();
  const uint8_t* cp = cache.data_ptr<uint8_t>();
  const int64_t* pg = pages.data_ptr<int64_t>();
  const int64_t* np = num_pages.data_ptr<int64_t>();
  const int64_t* fp = first_pos.data_ptr<int64_t>();
  const uint8_t* sp = stage.data_ptr<uint8_t>();
  const int64_t* slp = slots.data_ptr<int64_t>();
  const int64_t* olp = own_len.data_ptr<int64_t>();
  const int64_t* qpp = q_pos.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float cap = static_cast<float>(soft_cap), sc = static_cast<float>(scale);

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    // qk: q * scale in the keys' plane order; w: qk * key scales of a page; codes / v: one token's codes
    std::vector<float> qk(g * D), qv(g * D), w(g * D), bias(g), s(g * P), codes(D), ks(D), km(D), scl(std::max(v_groups, s_groups));
    std::vector<float> tile(P * D), tile_min(P * std::max(v_groups, s_groups)), qsum(g * sk_groups);
    std::vector<char> ok(P);
    auto finish_scores = [&]() {
      if (cap > 0)
        for (int64_t i = 0; i < g * P; ++i) s[i] = cap * std::tanh(s[i] / cap);
    };
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* qb = qp + (b * Hq + h * g) * D;
      const int64_t pos_q = qpp[b];
      for (int64_t qi = 0; qi < g; ++qi)
        for (int64_t c = 0; c < D; ++c) qk[qi * D + plane_index(c, k_per, k_row)] = qb[qi * D + c] * sc;
      Softmax vsm(g, D, v_groups);  // packed pages: values in the values' plane order
      for (int64_t c = 0; c < np[b]; ++c) {
        const uint8_t* page = cp + (pg[b * W + c] * H + h) * page_bytes;
        const uint16_t* kmeta = reinterpret_cast<const uint16_t*>(page + k_meta);  // [D][2], channel order
        for (int64_t i = 0; i < D; ++i) {
          const int64_t x = plane_index(i, k_per, k_row);
          ks[x] = half_to_float(kmeta[2 * i]);
          km[x] = half_to_float(kmeta[2 * i + 1]);
        }
        for (int64_t qi = 0; qi < g; ++qi) {
          const float* a = &qk[qi * D];
          float* o = &w[qi * D];
          for (int64_t i = 0; i < D; ++i) o[i] = a[i] * ks[i];
          bias[qi] = dot(a, km.data(), D);
        }
        const int64_t pos0 = fp[b] + c * P;
        for (int64_t t = 0; t < P; ++t) {
          ok[t] = window <= 0 || pos_q - (pos0 + t) < window;
          if (!ok[t]) {
            for (int64_t qi = 0; qi < g; ++qi) s[qi * P + t] = 0.f;
            continue;
          }
          unpack_planes(page + k_codes + t * k_row, k_bits, k_row, codes.data());
          for (int64_t qi = 0; qi < g; ++qi) s[qi * P + t] = bias[qi] + dot(&w[qi * D], codes.data(), D);
        }
        finish_scores();
        vsm.probabilities(P, s.data(), ok.data());
        value_tile(page + v_codes, v_bits, v_row, v_group / v_per, reinterpret_cast<const uint16_t*>(page + v_meta),
                   v_groups, ok.data(), P, D, scl.data(), tile.data(), tile_min.data());
        vsm.add_tile(P, s.data(), tile.data(), tile_min.data());
      }
      // own page from the staging slot: 8 bits per token (channel order), scale and minimum per token and
      // group (keys: 16 channels, values: 64); keys before own_len, all at or before the query
      const uint8_t* own = sp + (slp[b] * H + h) * stage_bytes;
      const uint16_t* skm = reinterpret_cast<const uint16_t*>(own + s_k_meta);  // [P][D / 16][2]
      const uint16_t* svm = reinterpret_cast<const uint16_t*>(own + s_v_meta);  // [P][D / 64][2]
      const int64_t own0 = pos_q - (olp[b] - 1);
      for (int64_t qi = 0; qi < g; ++qi) {
        for (int64_t c = 0; c < D; ++c) qv[qi * D + c] = qb[qi * D + c] * sc;
        for (int64_t j = 0; j < sk_groups; ++j) {
          float sum = 0.f;
          for (int64_t c = j * SKG; c < (j + 1) * SKG; ++c) sum += qv[qi * D + c];
          qsum[qi * sk_groups + j] = sum;
        }
      }
      for (int64_t t = 0; t < P; ++t) {
        ok[t] = t < olp[b] && (window <= 0 || pos_q - (own0 + t) < window);
        if (!ok[t]) {
          for (int64_t qi = 0; qi < g; ++qi) s[qi * P + t] = 0.f;
          continue;
        }
        unpack_planes(own + s_k_codes + t * D, 8, D, codes.data());
        for (int64_t j = 0; j < sk_groups; ++j) {  // codes times their group's scale; minima in the bias below
          const float scl = half_to_float(skm[(t * sk_groups + j) * 2]);
          for (int64_t c = j * SKG; c < (j + 1) * SKG; ++c) codes[c] *= scl;
        }
        for (int64_t qi = 0; qi < g; ++qi) {
          float score = dot(&qv[qi * D], codes.data(), D);
          for (int64_t j = 0; j < sk_groups; ++j) score += half_to_float(skm[(t * sk_groups + j) * 2 + 1]) * qsum[qi * sk_groups + j];
          s[qi * P + t] = score;
        }
      }
      finish_scores();
      // the own page's values go in channel order: a second state, merged below
      Softmax osm(g, D, s_groups);
      osm.m = vsm.m;  // share the running max so the two states add directly
      osm.probabilities(P, s.data(), ok.data());
      for (int64_t qi = 0; qi < g; ++qi) {
        const float alpha = std::exp(vsm.m[qi] - osm.m[qi]);  // rescale the pages' state to the new max
        if (vsm.m[qi] == kNegInf) continue;
        vsm.l[qi] *= alpha;
        for (int64_t i = 0; i < D; ++i) vsm.acc[qi * D + i] *= alpha;
        for (int64_t j = 0; j < v_groups; ++j) vsm.acc_min[qi * v_groups + j] *= alpha;
      }
      value_tile(own + s_v_codes, 8, D, SG, svm, s_groups, ok.data(), P, D, scl.data(), tile.data(), tile_min.data());
      osm.add_tile(P, s.data(), tile.data(), tile_min.data());
      for (int64_t qi = 0; qi < g; ++qi) {
        float* o = op + (b * Hq + h * g + qi) * D;
        const float l = vsm.l[qi] + osm.l[qi];
        const float inv = l > 0 ? 1.f / l : 0.f;
        for (int64_t c = 0; c < D; ++c) {
          const float pages_part = vsm.acc[qi * D + plane_index(c, v_per, v_row)] + vsm.acc_min[qi * v_groups + c / v_group];
          const float own_part = osm.acc[qi * D + c] + osm.acc_min[qi * s_groups + c / SG];
          o[c] = (pages_part + own_part) * inv;
        }
      }
    }
  });
  return out;
}

// q [B, Hq, D] fp32 (unscaled); cache uint8 [nb, H, page_bytes]; pages [B, W] int64, num_pages [B], first_pos [B];
// stage uint8 [slots, H, stage_bytes] (8-bit pages per token: keys in groups of 16 channels, values of 64), slots
// [B], own_len [B]; q_pos [B].
// layout: k_codes, k_meta, v_codes, v_meta offsets in a head page, and s_k_codes, s_k_meta, s_v_codes, s_v_meta in a
// staging page; k_bits, v_bits, v_group (64); window <= 0: none; soft_cap <= 0: none.  Returns [B, Hq, D] (values
// rotated).
torch::Tensor decode(torch::Tensor q, torch::Tensor cache, torch::Tensor pages, torch::Tensor num_pages,
                     torch::Tensor first_pos, torch::Tensor stage, torch::Tensor slots, torch::Tensor own_len,
                     torch::Tensor q_pos, int64_t k_codes, int64_t k_meta, int64_t v_codes, int64_t v_meta,
                     int64_t s_k_codes, int64_t s_k_meta, int64_t s_v_codes, int64_t s_v_meta,
                     int64_t k_bits, int64_t v_bits, int64_t v_group, int64_t s_k_group, double scale,
                     int64_t window, double soft_cap) {
  TORCH_CHECK(q.is_contiguous() && cache.is_contiguous() && pages.is_contiguous() && stage.is_contiguous(),
              "kvmix cpu decode: contiguous tensors expected");
  TORCH_CHECK(v_group == 64, "kvmix cpu decode: value groups of 64 channels");
  TORCH_CHECK(s_k_group == 16, "kvmix cpu decode: staged key groups of 16 channels");
#define KVMIX_BITS(D, KB)                                                                                      \
  if (k_bits == KB && v_bits == 2) return decode_sized<D, KB, 2>(q, cache, pages, num_pages, first_pos, stage, \
      slots, own_len, q_pos, k_codes, k_meta, v_codes, v_meta, s_k_codes, s_k_meta, s_v_codes, s_v_meta, scale,   \
      window, soft_cap);                                                                                          \
  if (k_bits == KB && v_bits == 4) return decode_sized<D, KB, 4>(q, cache, pages, num_pages, first_pos, stage, \
      slots, own_len, q_pos, k_codes, k_meta, v_codes, v_meta, s_k_codes, s_k_meta, s_v_codes, s_v_meta, scale,   \
      window, soft_cap);                                                                                          \
  if (k_bits == KB && v_bits == 8) return decode_sized<D, KB, 8>(q, cache, pages, num_pages, first_pos, stage, \
      slots, own_len, q_pos, k_codes, k_meta, v_codes, v_meta, s_k_codes, s_k_meta, s_v_codes, s_v_meta, scale,   \
      window, soft_cap);
#define KVMIX_SIZE(D)     \
  if (q.size(2) == D) {   \
    KVMIX_BITS(D, 2)      \
    KVMIX_BITS(D, 4)      \
    KVMIX_BITS(D, 8)      \
  }
  KVMIX_SIZE(64)
  KVMIX_SIZE(128)
  KVMIX_SIZE(256)
  KVMIX_SIZE(512)
#undef KVMIX_SIZE
#undef KVMIX_BITS
  TORCH_CHECK(false, "kvmix cpu decode: no instantiation for head size ", q.size(2), ", k", k_bits, "v", v_bits);
}

// Copy new tokens' 8-bit codes and fp16 metadata of one side (keys or rotated values) into staging slots (no
// arithmetic: the codes come from the reference quantizer).  codes uint8 [N, H, D], meta fp16 bits int16
// [N, H, G, 2]; rows [M] (which of N), at [M] (slot * 64 + position in the page); codes_off / meta_off: the side's
// offsets in a staging head page.
void store_stage(torch::Tensor stage, torch::Tensor codes, torch::Tensor meta, torch::Tensor rows, torch::Tensor at,
                 int64_t codes_off, int64_t meta_off) {
  TORCH_CHECK(stage.is_contiguous() && codes.is_contiguous() && meta.is_contiguous() && rows.is_contiguous() &&
              at.is_contiguous(), "kvmix store_stage: contiguous tensors expected");
  const int64_t H = stage.size(1), stage_bytes = stage.size(2), D = codes.size(2), M = rows.size(0);
  const int64_t meta_bytes = meta.size(2) * 2 * 2, P = 64;
  TORCH_CHECK(codes.size(1) == H && meta.size(1) == H, "kvmix store_stage: codes and meta of H heads");
  uint8_t* sp = stage.data_ptr<uint8_t>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const uint8_t* mp = reinterpret_cast<const uint8_t*>(meta.data_ptr());
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* ap = at.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) {
    const int64_t slot = ap[m] / P, pos = ap[m] % P;
    for (int64_t h = 0; h < H; ++h) {
      uint8_t* head = sp + (slot * H + h) * stage_bytes;
      const int64_t src = rp[m] * H + h;
      std::memcpy(head + codes_off + pos * D, cp + src * D, D);
      std::memcpy(head + meta_off + pos * meta_bytes, mp + src * meta_bytes, meta_bytes);
    }
  }
}

// x [N, D] fp32, in place: each row times the normalized Sylvester Hadamard matrix (fast Walsh-Hadamard transform:
// log2(D) butterfly stages, then 1 / sqrt(D)).  Row by row in a fixed order: a row's result does not depend on how
// many rows there are (a BLAS product picks its blocking by shape).
void rotate_rows(torch::Tensor x) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == torch::kFloat && x.dim() == 2, "kvmix rotate_rows: [N, D] fp32");
  const int64_t N = x.size(0), D = x.size(1);
  TORCH_CHECK(D > 0 && (D & (D - 1)) == 0, "kvmix rotate_rows: D a power of two");
  float* p = x.data_ptr<float>();
  const float norm = 1.0f / std::sqrt(static_cast<float>(D));
  for (int64_t n = 0; n < N; ++n) {
    float* row = p + n * D;
    for (int64_t h = 1; h < D; h *= 2) {
      for (int64_t i = 0; i < D; i += 2 * h) {
        float* __restrict a = row + i;
        float* __restrict b = row + i + h;
        for (int64_t j = 0; j < h; ++j) {
          const float u = a[j], v = b[j];
          a[j] = u + v;
          b[j] = u - v;
        }
      }
    }
    for (int64_t i = 0; i < D; ++i) row[i] *= norm;
  }
}
