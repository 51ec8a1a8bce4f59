// Decode attention over packed kvmix pages on CPU: one query row per request, every query head of a KV head
// together.  Reads the packed codes once (no dequantized copy): scores are (q * k_scale) . codes + q . k_min per
// page (keys per channel), values code * scale + min per token and 64-channel group.  Online softmax per page.
// Built at first use by torch.utils.cpp_extension (vllm_kvmix/cpu_kernel.py); tested against the reference.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

inline float half_to_float(uint16_t h) {
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// the codes of every byte value as floats, low bits first: [256][8 / bits]
struct Tables {
  float four[256][2], two[256][4];
  Tables() {
    for (int b = 0; b < 256; ++b) {
      for (int j = 0; j < 2; ++j) four[b][j] = (b >> (4 * j)) & 15;
      for (int j = 0; j < 4; ++j) two[b][j] = (b >> (2 * j)) & 3;
    }
  }
};
const Tables tables;

// codes of one token: bytes -> out[0..d) as floats (low bits first), one table row per byte
inline void unpack(const uint8_t* row, int bits, int d, float* out) {
  if (bits == 8) {
    for (int i = 0; i < d; ++i) out[i] = row[i];
  } else if (bits == 4) {
    for (int i = 0; i < d / 2; ++i) std::memcpy(out + 2 * i, tables.four[row[i]], 2 * sizeof(float));
  } else {  // 2
    for (int i = 0; i < d / 4; ++i) std::memcpy(out + 4 * i, tables.two[row[i]], 4 * sizeof(float));
  }
}

struct Softmax {
  std::vector<float> m, l, acc;  // per query head; acc [g][d]
  Softmax(int g, int d) : m(g, -std::numeric_limits<float>::infinity()), l(g, 0.f), acc(g * d, 0.f) {}
  // merge one block of n scores s[g][n] whose values come from value(t, out[d])
  template <typename V>
  void add(int g, int d, int n, std::vector<float>& s, std::vector<char>& ok, V value, std::vector<float>& v) {
    for (int qi = 0; qi < g; ++qi) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int t = 0; t < n; ++t)
        if (ok[t]) mx = std::max(mx, s[qi * n + t]);
      if (mx == -std::numeric_limits<float>::infinity()) continue;
      float m_new = std::max(m[qi], mx);
      float alpha = std::exp(m[qi] - m_new);  // 0 when m was -inf
      l[qi] *= alpha;
      for (int i = 0; i < d; ++i) acc[qi * d + i] *= alpha;
      m[qi] = m_new;
      float* row = &s[qi * n];
      for (int t = 0; t < n; ++t) row[t] = ok[t] ? row[t] - m_new : -std::numeric_limits<float>::infinity();
      for (int t = 0; t < n; ++t) row[t] = std::exp(row[t]);  // vectorizes (libmvec); exp(-inf) = 0
    }
    for (int t = 0; t < n; ++t) {
      if (!ok[t]) continue;
      value(t, v.data());
      for (int qi = 0; qi < g; ++qi) {
        float p = s[qi * n + t];
        if (p == 0.f) continue;
        l[qi] += p;
        float* a = &acc[qi * d];
        for (int i = 0; i < d; ++i) a[i] += p * v[i];
      }
    }
  }
};

}  // namespace

// q [B, Hq, D] fp32 (unscaled); cache uint8 [nb, H, page_bytes]; pages [B, W] int64, num_pages [B], first_pos [B];
// stage uint8 [slots, H, stage_bytes] (8-bit pages per token, groups of 64), slots [B], own_len [B]; q_pos [B].
// layout: k_codes, k_meta, v_codes, v_meta offsets in a head page, and s_k_codes, s_k_meta, s_v_codes, s_v_meta in a
// staging page; k_bits, v_bits, v_group; window <= 0: none; soft_cap <= 0: none.  Returns [B, Hq, D] (values
// rotated).
torch::Tensor decode(torch::Tensor q, torch::Tensor cache, torch::Tensor pages, torch::Tensor num_pages,
                     torch::Tensor first_pos, torch::Tensor stage, torch::Tensor slots, torch::Tensor own_len,
                     torch::Tensor q_pos, int64_t k_codes, int64_t k_meta, int64_t v_codes, int64_t v_meta,
                     int64_t s_k_codes, int64_t s_k_meta, int64_t s_v_codes, int64_t s_v_meta,
                     int64_t k_bits, int64_t v_bits, int64_t v_group, double scale, int64_t window,
                     double soft_cap) {
  TORCH_CHECK(q.is_contiguous() && cache.is_contiguous() && pages.is_contiguous() && stage.is_contiguous(),
              "kvmix cpu decode: contiguous tensors expected");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), P = 64;
  const int64_t H = cache.size(1), page_bytes = cache.size(2), W = pages.size(1), stage_bytes = stage.size(2);
  const int64_t g = Hq / H, groups = D / v_group;
  const int64_t k_row = D * k_bits / 8, v_row = D * v_bits / 8;
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
  const float cap = static_cast<float>(soft_cap);

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(g * D), qm(g), s(g * P), codes(D), v(D), ks(D), km(D);
    std::vector<char> ok(P);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* qb = qp + (b * Hq + h * g) * D;
      const int64_t pos_q = qpp[b];
      Softmax sm(g, D);
      auto finish_scores = [&](int n) {
        if (cap > 0)
          for (int i = 0; i < g * n; ++i) s[i] = cap * std::tanh(s[i] / cap);
      };
      for (int64_t c = 0; c < np[b]; ++c) {
        const uint8_t* page = cp + (pg[b * W + c] * H + h) * page_bytes;
        const uint16_t* kmeta = reinterpret_cast<const uint16_t*>(page + k_meta);  // [D][2]
        for (int64_t i = 0; i < D; ++i) {
          ks[i] = half_to_float(kmeta[2 * i]);
          km[i] = half_to_float(kmeta[2 * i + 1]);
        }
        for (int64_t qi = 0; qi < g; ++qi) {
          float bias = 0.f;
          for (int64_t i = 0; i < D; ++i) {
            float x = qb[qi * D + i] * static_cast<float>(scale);
            qs[qi * D + i] = x * ks[i];
            bias += x * km[i];
          }
          qm[qi] = bias;
        }
        const int64_t pos0 = fp[b] + c * P;
        for (int64_t t = 0; t < P; ++t) {
          ok[t] = window <= 0 || pos_q - (pos0 + t) < window;
          if (!ok[t]) continue;
          unpack(page + k_codes + t * k_row, k_bits, D, codes.data());
          for (int64_t qi = 0; qi < g; ++qi) {
            float dot = qm[qi];
            const float* w = &qs[qi * D];
            for (int64_t i = 0; i < D; ++i) dot += w[i] * codes[i];
            s[qi * P + t] = dot;
          }
        }
        finish_scores(P);
        const uint16_t* vmeta = reinterpret_cast<const uint16_t*>(page + v_meta);  // [P][groups][2]
        sm.add(g, D, P, s, ok, [&](int64_t t, float* out_v) {
          unpack(page + v_codes + t * v_row, v_bits, D, out_v);
          for (int64_t j = 0; j < groups; ++j) {
            float sc = half_to_float(vmeta[(t * groups + j) * 2]), mn = half_to_float(vmeta[(t * groups + j) * 2 + 1]);
            for (int64_t i = j * v_group; i < (j + 1) * v_group; ++i) out_v[i] = out_v[i] * sc + mn;
          }
        }, v);
      }
      // own page from the staging slot: 8 bits per token, groups of 64 channels; keys before own_len, all at or
      // before the query
      const uint8_t* own = sp + (slp[b] * H + h) * stage_bytes;
      const uint16_t* skm = reinterpret_cast<const uint16_t*>(own + s_k_meta);  // [P][D / 64][2]
      const uint16_t* svm = reinterpret_cast<const uint16_t*>(own + s_v_meta);
      const int64_t own0 = pos_q - (olp[b] - 1), sg = D / 64;
      auto dequant8 = [&](const uint8_t* codes_row, const uint16_t* meta, int64_t t, float* out_v) {
        for (int64_t j = 0; j < sg; ++j) {
          float sc = half_to_float(meta[(t * sg + j) * 2]), mn = half_to_float(meta[(t * sg + j) * 2 + 1]);
          for (int64_t i = j * 64; i < (j + 1) * 64; ++i) out_v[i] = codes_row[i] * sc + mn;
        }
      };
      for (int64_t t = 0; t < P; ++t) {
        ok[t] = t < olp[b] && (window <= 0 || pos_q - (own0 + t) < window);
        if (!ok[t]) continue;
        dequant8(own + s_k_codes + t * D, skm, t, codes.data());
        for (int64_t qi = 0; qi < g; ++qi) {
          float dot = 0.f;
          for (int64_t i = 0; i < D; ++i) dot += qb[qi * D + i] * codes[i];
          s[qi * P + t] = dot * static_cast<float>(scale);
        }
      }
      finish_scores(P);
      sm.add(g, D, P, s, ok, [&](int64_t t, float* out_v) { dequant8(own + s_v_codes + t * D, svm, t, out_v); }, v);
      for (int64_t qi = 0; qi < g; ++qi) {
        float* o = op + (b * Hq + h * g + qi) * D;
        const float inv = sm.l[qi] > 0 ? 1.f / sm.l[qi] : 0.f;
        for (int64_t i = 0; i < D; ++i) o[i] = sm.acc[qi * D + i] * inv;
      }
    }
  });
  return out;
}
