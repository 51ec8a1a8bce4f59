// Decode attention of the kvmix page scheme (one query token per request): packed pages and the
// request's own 8-bit staged page, in one launch per layer.
//
// Reads the page layouts of vllm_kvmix.formats (64-token pages, head size D = 64, 128 or 256: a template
// parameter, one instantiation per head size) as they are:
//   packed keys   [64 tokens][D * KB / 8 bytes], channel 2j / 2j+1 in the low / high bits of byte j
//                 (KB = 4), then fp16 (scale, minimum) per channel over the page;
//   packed values [64 tokens][D * VB / 8 bytes] (Hadamard-rotated over the head), then fp16 (scale,
//                 minimum) per token and 64-channel group;
//   staged page   keys and rotated values at 8 bits per token, (scale, minimum) per token and group of
//                 16 (keys) / 64 (values) channels.
// The thread layout scales with D (HeadShape): each lane quad position holds D / 4 query / key channels,
// each mma row group g D / 8 value channels.  A page is read in passes of HeadShape::T tokens: the whole
// page for D <= 128; 32 tokens for D = 256, so a pass holds as many code bytes as one page of head size 128.
// Grid: (query block = one request's token, (KV head, chunk), split): a KV head's GQA group of rep query
// heads in chunks of up to 8 (the mma's rows), one block each; NW warps per block, each warp walks its own
// pages (p = first + warp, + NW, ...) with its own online softmax, merged in shared memory at the end.
// Pages [0, own) come from the cache, page `own` from the request's staging slot; with a sliding window
// (WINDOW), pages from the window's first one, its tokens before the window masked.
//   Staging (`stage_new`): the block whose split holds page `own` first quantizes the step's new key and
//   value (the value Hadamard-rotated by a fast Walsh-Hadamard transform across the warp) to 8 bits into
//   the staging slot -- what page.py's _stage_kernel does for a general batch -- and then reads the page
//   (each chunk's block writes the same bytes).
//   Split-K: each block writes its (max, sum, acc) partial to the workspace; the last block of a (row, KV
//   head, chunk) to finish (a counter each, reset by that block) merges them.  With one split the block
//   merges its warps only.  The merged output is rotated back (x H, the same transform) and stored in
//   the query's dtype.
//
// Tensor cores (mma.sync m16n8k16, fp16 operands, fp32 accumulation) with the roles chosen so the codes
// reach the operand registers as whole 32-bit words:
//   S  = Q K^T:   A = query (rows = the REP heads of the KV head, padded to 16), B = key codes, n = token
//                 (8-bit keys, attend_page).  A thread's B registers hold channels (c, c + 16 / KB) of one
//                 token: one word of codes, each field read in place under the exponent that makes its unit 1
//                 (code_field: the exact fp16 number 2^(10 - o) + code).  The per-channel scale goes to the
//                 query (Q' = Q * scale, per page) and the minimum and the fields' offsets into a per-page
//                 correction computed by the tensor cores (sum_c Q m - sum_c offset Q'), which seeds the S
//                 accumulators.
//   S^T = K Q'^T: the same with the roles swapped (4-bit keys, attend_page_st): the codes of two tokens fill
//                 an A quad, the query is the B pair, so no zero-padded A registers and half the S mmas; P^T
//                 reaches the value mma's B layout by movmatrix.
//   O^T = V^T P^T: A = value codes (rows = channels, k = tokens: two tokens' words interleaved with one
//                 PRMT), dequantized in fp16 (subtract the field's offset exactly, FMA per-token scale /
//                 minimum); B = P (with S = Q K^T straight from the S accumulators, whose layout is the B
//                 layout of the next mma).
// The softmax runs in base 2 (log2(e) folded into the query scale).

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define KVMIX_P 64
#define KVMIX_ROWS 8         // query heads per block (the mma's rows g; workspace rows per split): cuda_decode.ROWS
#define KVMIX_MAX_SPLITS 64  // split-K partials the last block merges (sm_w): cuda_decode.MAX_SPLITS
#define KVMIX_SKG 16         // channels per staged key group: formats.STAGE_KEY_GROUP
// Blocks per SM the register allocation is bounded for at head sizes 64 / 128: 4 (128 registers, ~72-96 bytes of
// spills at 128) as served; head size 256 (twice the accumulators and query registers) at KVMIX_MIN_BLOCKS_256.
// page_bench.py --experiments KVMIX_MIN_BLOCKS=3 / 5 times the others beside it (H200: 3 blocks at 158-168
// registers without spills and 5 at 96 with ~300 bytes of spills are both 13-26% slower at 64 x 8k; an L2
// prefetch of each warp's next page, 1 or 2 turns ahead, was up to 1.6x slower for k8v4: docs/kernels.md).
#ifndef KVMIX_MIN_BLOCKS
#define KVMIX_MIN_BLOCKS 4
#endif
#ifndef KVMIX_MIN_BLOCKS_256
#define KVMIX_MIN_BLOCKS_256 2
#endif
// S layout per key width (kvmix_page_decode): 4-bit keys compute S transposed (attend_page_st), 8-bit keys
// S = Q K^T (attend_page).  Timed on the H200 (commit 71fda59, docs/kernels.md): the transposed S is
// 0.88 / 0.90 of the step time for k4v2 / k4v4 at 64 x 8k, 1.02-1.05 for k8v4, whose wider key words take
// its stack from 80 to 128 bytes.
#define KVMIX_NEG_INF __int_as_float(0xff800000)
// At least this many pages a split (0: none).  A decode graph's split count is fixed by the model's longest
// context, so a short context spreads a page or two over each split and the last block merges every split's
// partial; with a floor, the splits past the last one with pages exit at once and the merge reads only the
// others (batch 1 x 8k in a graph planned for 128k: 32 splits of 4 pages instead of 64 of 2; H100, head size
// 64 / 128 / 256: 0.009 / 0.014 / 0.019 ms against 0.011 / 0.016 / 0.028, docs/results.md section 2).
// Sliding-window instantiations take no floor (1 page): their split count is planned on the pages the window
// spans (splitk.pages_read), which a long row reads in full.  head_size_bench.py / page_bench.py --experiments
// KVMIX_MIN_SPLIT_PAGES=N time another floor.
#ifndef KVMIX_MIN_SPLIT_PAGES
#define KVMIX_MIN_SPLIT_PAGES 4
#endif
// Packed page passes a warp keeps in its shared-memory ring (cuda_decode.RING_STAGES): the next pass is copied
// (cp.async) while the current one is computed, so no registers wait on loads in flight.
#ifndef KVMIX_RING_STAGES
#define KVMIX_RING_STAGES 2
#endif

struct alignas(16) u32x4 {
  u32 x, y, z, w;
};

// What a thread holds at head size D (64, 128 or 256), and the page pass of T tokens.
template <int D>
struct HeadShape {
  static_assert(D == 64 || D == 128 || D == 256, "head sizes 64, 128, 256");
  static constexpr int QP = D / 8;    // query fp16 pairs per thread (channels of lane quad position qd: D / 4)
  static constexpr int QC = D / 4;    // query / key channels per lane quad position
  static constexpr int NK = D / 16;   // k-steps of the S mma (16 channels each)
  static constexpr int VC = D / 8;    // value channels per row group g (acc rows)
  static constexpr int VMT = D / 16;  // m-tiles of the value mma (acc[VMT][4])
  static constexpr int NG = D / 64;   // 64-channel groups per token (value meta)
  static constexpr int NKG = QC / KVMIX_SKG;  // staged key groups of a lane quad position's channels
  static constexpr int LC = D / 32;   // channels per lane of a whole vector (staging, rotation, output)
  static constexpr int T = D > 128 ? 32 : KVMIX_P;  // tokens per page pass (cuda_decode.pass_tokens)
  // packed pages through each warp's shared-memory ring (cuda_decode.ring): head size 256 only (at 64 / 128 the
  // ring's shared memory costs a block per SM and the loads into registers are faster: docs/kernels.md)
  static constexpr bool RING = D > 128;
  static constexpr int MIN_BLOCKS = D > 128 ? KVMIX_MIN_BLOCKS_256 : KVMIX_MIN_BLOCKS;
};

__device__ __forceinline__ void mma16816(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// d = a b + c with separate accumulator input (no register copies to seed d from c).
__device__ __forceinline__ void mma16816_c(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1,
                                           const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
  u32 r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

__device__ __forceinline__ u32 hmul2(u32 a, u32 b) {
  u32 r;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}

__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
  u32 r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

__device__ __forceinline__ u32 hadd2(u32 a, u32 b) {
  u32 r;
  asm("add.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}

__device__ __forceinline__ u32 pack_f16x2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ float ex2(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ u16 f32_to_f16_bits(float x) {
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
  return h;
}

template <bool BF16>
__device__ __forceinline__ u16 f32_to_out(float x) {
  u16 h;
  if (BF16)
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
  else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
  return h;
}

template <bool BF16>
__device__ __forceinline__ float in_to_f32(u16 h) {
  if (BF16) return __uint_as_float(((u32)h) << 16);
  return f16_to_f32(h);
}

// x H for the normalized D-point Sylvester Hadamard matrix (vllm_kvmix.quant.hadamard, symmetric) of a
// vector spread over one warp, lane l holding channels LC l .. LC l + LC - 1 (LC = D / 32): butterflies of
// stride 1 .. LC / 2 in registers, LC .. D / 2 across lanes.  Exact fp32 adds; one rounding of the
// 1/sqrt(D) scale at the end.
template <int D>
__device__ __forceinline__ void fwht(float (&x)[D / 32], int lane) {
  constexpr int LC = D / 32;
#pragma unroll
  for (int h = 1; h < LC; h <<= 1) {
    float y[LC];
#pragma unroll
    for (int i = 0; i < LC; ++i) y[i] = (i & h) ? x[i - h] - x[i] : x[i] + x[i + h];
#pragma unroll
    for (int i = 0; i < LC; ++i) x[i] = y[i];
  }
#pragma unroll
  for (int s = 0; s < 5; ++s) {
    const bool upper = (lane >> s) & 1;
#pragma unroll
    for (int i = 0; i < LC; ++i) {
      const float y = __shfl_xor_sync(0xffffffffu, x[i], 1 << s);
      x[i] = upper ? y - x[i] : x[i] + y;
    }
  }
  constexpr float norm = D == 64 ? 0.125f : D == 128 ? 0.08838834764831845f : 0.0625f;  // 1 / sqrt(D)
#pragma unroll
  for (int i = 0; i < LC; ++i) x[i] *= norm;
}

// One token's D channels (lane l holds LC l .. LC l + LC - 1) at 8 bits per GROUP-channel group into a staged
// page at token `off`: codes at codes_off + off * D, fp16 (scale, minimum) at meta_off + off * 4 (D / GROUP)
// + 4 group.  The arithmetic of vllm_kvmix.quant.quantize (codec.minmax_meta / quant_rows in the Triton kernels).
template <int D, int GROUP>
__device__ __forceinline__ void stage_row(u8* page, int off, float (&x)[D / 32], int lane, int codes_off,
                                          int meta_off) {
  constexpr int LC = D / 32, GL = GROUP / LC;  // channels per lane, lanes per group
  static_assert(GL >= 1 && GL <= 32, "a group spans whole lanes");
  float mn = 65504.f, mx = -65504.f;
#pragma unroll
  for (int i = 0; i < LC; ++i) {
    x[i] = fminf(fmaxf(x[i], -65504.f), 65504.f);
    mn = fminf(mn, x[i]);
    mx = fmaxf(mx, x[i]);
  }
#pragma unroll
  for (int s = 1; s < GL; s <<= 1) {  // the lanes of the group
    mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, s));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, s));
  }
  const u16 mn16 = f32_to_f16_bits(mn);
  const float mnf = f16_to_f32(mn16);
  u16 sc16 = f32_to_f16_bits(fminf(__fdiv_rn(mx - mnf, 255.f), 65504.f));
  if (mnf + 255.f * f16_to_f32(sc16) > 65504.f) sc16 -= 1;  // one ulp toward zero keeps the top level finite
  const float sc = f16_to_f32(sc16);
  const float inv = sc > 0.f ? __fdiv_rn(1.f, sc) : 0.f;
  u32 word[(LC + 3) / 4] = {};
#pragma unroll
  for (int i = 0; i < LC; ++i) {
    const float y = fminf(fmaxf(floorf((x[i] - mnf) * inv + 0.5f), 0.f), 255.f);
    word[i / 4] |= ((u32)y) << (8 * (i % 4));
  }
  u8* codes = page + codes_off + off * D + LC * lane;
  if constexpr (LC == 2) {
    *reinterpret_cast<u16*>(codes) = (u16)word[0];
  } else {
#pragma unroll
    for (int w = 0; w < LC / 4; ++w) reinterpret_cast<u32*>(codes)[w] = word[w];
  }
  if ((lane & (GL - 1)) == 0)
    *reinterpret_cast<u32*>(page + meta_off + off * 4 * (D / GROUP) + 4 * (lane / GL)) = (u32)sc16 | ((u32)mn16 << 16);
}

// 16-bit halves of `w` hold codes at bit `shift` -> (1024 + code_lo, 1024 + code_hi) as fp16x2.
// (The code-field helpers also compile for the host: tests/test_page_kernels.py checks them on a CPU.)
template <int BITS>
__host__ __device__ __forceinline__ u32 code_pair(u32 w, int shift) {
  const u32 mask = ((1u << BITS) - 1) * 0x00010001u;
#ifdef __CUDA_ARCH__
  u32 r;  // (x & mask) | 0x64006400 in one LOP3
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(w >> shift), "n"(mask), "n"(0x64006400u));
  return r;
#else
  return ((w >> shift) & mask) | 0x64006400u;
#endif
}

// The field at bit o of each 16-bit half of w -> (offset + code) as exact fp16x2, with one shift a word at
// most: a field inside the mantissa (o + BITS <= 10) stays where it is, under the exponent that makes its unit
// 1 (exponent field 25 - o: offset 2^(10 - o)); a field above it is read the same way from w >> 8 at o - 8
// (the compiler shares that shift across the word).  field_offset_neg gives the matching -offset, which the
// keys' correction mma and the values' HADD2 remove, so codes stay exact.  (code_pair, shifting every field
// to bit 0 under the exponent of 1024, was 208 of k4v2's 1,380 instructions per packed page.)
__host__ __device__ __forceinline__ constexpr int field_at(int bits, int o) { return o + bits <= 10 ? o : o - 8; }

template <int BITS>
__host__ __device__ __forceinline__ u32 code_field(u32 w, int o) {
  const int f = field_at(BITS, o);
  const u32 x = o + BITS <= 10 ? w : w >> 8;
  const u32 mask = (((1u << BITS) - 1) << f) * 0x00010001u;
  const u32 expo = ((u32)(25 - f) << 10) * 0x00010001u;
#ifdef __CUDA_ARCH__
  u32 r;  // (x & mask) | expo in one LOP3
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(x), "r"(mask), "r"(expo));
  return r;
#else
  return (x & mask) | expo;
#endif
}

// -offset of code_field<BITS>(., o) as fp16x2
template <int BITS>
__host__ __device__ __forceinline__ u32 field_offset_neg(int o) {
  return (0x8000u | ((u32)(25 - field_at(BITS, o)) << 10)) * 0x00010001u;
}

template <bool BF16>
__device__ __forceinline__ float load_q(const u16* q, long long off) {
  u16 h = q[off];
  if (BF16) return __uint_as_float(((u32)h) << 16);
  return f16_to_f32(h);
}

// Key channel of pair `pi` (0 .. QP - 1: k-step pi / 2, register pi % 2), half `e`, for lane quad position qd:
// word i = pi / (16 / KB) of the thread's D * KB / 32 code bytes, extraction j = pi % (16 / KB).
template <int KB, int D>
__device__ __forceinline__ int key_channel(int qd, int pi, int e) {
  const int per_word = 16 / KB;  // extractions per 32-bit word
  const int i = pi / per_word, j = pi % per_word;
  return HeadShape<D>::QC * qd + i * (32 / KB) + e * per_word + j;
}


// A page pass's codes as one thread holds them (tokens t0 .. t0 + T - 1 of the page): key codes of tokens
// t0 + 8 nt + g (the thread's quarter qd of each token's row), value codes and meta of tokens
// t0 + 16 kt + 8 hh + 2 qd + e (channels VC g .. VC g + VC - 1).
template <int CKB, int VB, int D>
struct PageCodes {
  static constexpr int T = HeadShape<D>::T;
  static constexpr int CBK = D * CKB / 8;  // key code bytes per token
  static constexpr int KW = CBK / 16;      // key code words per thread per token (2 .. 16)
  static constexpr int CBV = D * VB / 8;   // value code bytes per token
  static constexpr int VH = D * VB / 128;  // 16-bit halves of value codes per thread per token (VC channels)
  static constexpr int VW = VH > 1 ? VH / 2 : 1;  // value code words per thread per token (VH = 1: the low half)
  u32 kc[T / 8][KW];
  u32 vc[T / 16][2][2][VW], vm[T / 16][2][2];

  // the thread's quarter qd of token t's key code row
  static __device__ __forceinline__ void load_key_row(const u8* page, int t, int qd, u32 (&row)[KW]) {
    if constexpr (KW % 4 == 0) {
      const u32x4* src = reinterpret_cast<const u32x4*>(page + t * CBK + qd * (CBK / 4));
#pragma unroll
      for (int i = 0; i < KW / 4; ++i) {
        u32x4 v = src[i];
        row[4 * i] = v.x; row[4 * i + 1] = v.y; row[4 * i + 2] = v.z; row[4 * i + 3] = v.w;
      }
    } else {  // 8 bytes (head size 64, 4-bit keys)
      const uint2 v = *reinterpret_cast<const uint2*>(page + t * CBK + qd * (CBK / 4));
      row[0] = v.x; row[1] = v.y;
    }
  }

  __device__ __forceinline__ void load(const u8* page, int t0, int g, int qd, int v_codes_off, int v_meta_off) {
#pragma unroll
    for (int nt = 0; nt < T / 8; ++nt) load_key_row(page, t0 + 8 * nt + g, qd, kc[nt]);
    load_values(page, t0, g, qd, v_codes_off, v_meta_off);
  }

  __device__ __forceinline__ void load_values(const u8* page, int t0, int g, int qd, int v_codes_off, int v_meta_off) {
#pragma unroll
    for (int kt = 0; kt < T / 16; ++kt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int t = t0 + 16 * kt + 8 * hh + 2 * qd + e;
          const u8* src = page + v_codes_off + t * CBV + g * (CBV / 8);
          if constexpr (VH == 1) {
            vc[kt][hh][e][0] = *reinterpret_cast<const u16*>(src);
          } else {
#pragma unroll
            for (int w = 0; w < VW; ++w) vc[kt][hh][e][w] = reinterpret_cast<const u32*>(src)[w];
          }
          vm[kt][hh][e] = reinterpret_cast<const u32*>(page + v_meta_off)[t * (D / 64) + ((g * (D / 8)) >> 6)];
        }
  }
};

// A packed page's per-channel key meta (fp16 scale, minimum of the thread's QC channels) into km, and the query
// scaled per channel: qp = Q' = Q * scale, in the query's channel order (key_channel<QKB, D>).
template <int QKB, int D>
__device__ __forceinline__ void scale_query(const u8* page, int k_meta_off, int qd, const u32 (&qs)[D / 8],
                                            u32 (&km)[D / 4], u32 (&qp)[D / 8]) {
  constexpr int QC = HeadShape<D>::QC;
  const u32x4* src = reinterpret_cast<const u32x4*>(page + k_meta_off + 4 * QC * qd);
#pragma unroll
  for (int i = 0; i < QC / 4; ++i) {
    u32x4 v = src[i];
    km[4 * i] = v.x; km[4 * i + 1] = v.y; km[4 * i + 2] = v.z; km[4 * i + 3] = v.w;
  }
#pragma unroll
  for (int pi = 0; pi < D / 8; ++pi) {
    const int c0 = key_channel<QKB, D>(qd, pi, 0) - QC * qd, c1 = key_channel<QKB, D>(qd, pi, 1) - QC * qd;
    qp[pi] = hmul2(qs[pi], prmt(km[c0], km[c1], 0x5410));
  }
}

// The minima of the channels of query pair pi as an fp16 pair (from scale_query's km).
template <int QKB, int D>
__device__ __forceinline__ u32 key_min_pair(const u32 (&km)[D / 4], int qd, int pi) {
  constexpr int QC = HeadShape<D>::QC;
  return prmt(km[key_channel<QKB, D>(qd, pi, 0) - QC * qd], km[key_channel<QKB, D>(qd, pi, 1) - QC * qd], 0x7632);
}

// An 8-bit staged key token's (scale, minimum) words (fp16 scale low, minimum high) of the groups of the thread's
// channels QC qd .. QC qd + QC - 1 (KVMIX_SKG channels each).
template <int D>
__device__ __forceinline__ void staged_key_meta(const u8* page, int k_meta_off, int t, int qd,
                                                u32 (&w)[HeadShape<D>::NKG]) {
  constexpr int NKG = HeadShape<D>::NKG;
  const u32* src = reinterpret_cast<const u32*>(page + k_meta_off) + t * (D / KVMIX_SKG) + NKG * qd;
#pragma unroll
  for (int i = 0; i < NKG; ++i) w[i] = src[i];
}

// An 8-bit staged key token (the thread's QC code bytes: a PageCodes kc row) dequantized for the channels of
// query pair pi: fp16 pair code * scale + minimum, with their group's (scale, minimum) from w (the two channels
// of a pair lie within 16 / KB * 2 <= 16 of each other, in one group: key_channel).
template <int QKB, int D, int KW>
__device__ __forceinline__ u32 staged_key_pair(const u32 (&row)[KW], int qd, int pi,
                                               const u32 (&w)[HeadShape<D>::NKG]) {
  constexpr int QC = HeadShape<D>::QC;
  const int c0 = key_channel<QKB, D>(qd, pi, 0) - QC * qd, c1 = key_channel<QKB, D>(qd, pi, 1) - QC * qd;
  const u32 sel = (c0 & 3) | ((c0 & 3) << 4) | ((4 + (c1 & 3)) << 8) | ((4 + (c1 & 3)) << 12);
  const u32 y = code_pair<8>(prmt(row[c0 >> 2], row[c1 >> 2], sel), 0);
  const u32 m = w[c0 / KVMIX_SKG];
  return hfma2(hadd2(y, 0xE400E400u), prmt(m, m, 0x1010), prmt(m, m, 0x3232));
}

// O^T += V^T P^T for one page pass: A rows g / g + 8 of m-tile mt = channels VC g + 2 mt / + 1 (value codes
// dequantized in fp16: code field - its offset, then FMA per-token scale / minimum); B = pb[kt], the P^T tile
// of the pass's tokens 16 kt .. 16 kt + 15.  STAGED: values of tokens >= n_valid (counted from the pass's
// first token) are zeroed (stale bytes).
template <int CKB, int VB, bool STAGED, int D>
__device__ __forceinline__ void add_values(const PageCodes<CKB, VB, D>& pc, const u32 (&pb)[HeadShape<D>::T / 16][2],
                                           int n_valid, int qd, float (&acc)[D / 16][4]) {
  using PC = PageCodes<CKB, VB, D>;
  constexpr int VW = PC::VW;
#pragma unroll
  for (int kt = 0; kt < PC::T / 16; ++kt) {
    u32 va[2][D / 8];  // [hh][channel e = 0 .. VC - 1 of the thread]: fp16 pair (token 2qd, 2qd + 1)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const u32 sc = prmt(pc.vm[kt][hh][0], pc.vm[kt][hh][1], 0x5410);
      const u32 mn = prmt(pc.vm[kt][hh][0], pc.vm[kt][hh][1], 0x7632);
      u32 keep = 0xFFFFFFFFu;
      if (STAGED) {
        const int t = 16 * kt + 8 * hh + 2 * qd;
        keep = (t < n_valid ? 0x0000FFFFu : 0u) | (t + 1 < n_valid ? 0xFFFF0000u : 0u);
      }
#pragma unroll
      for (int w = 0; w < VW; ++w) {
#pragma unroll
        for (int half = 0; half < (PC::VH > 1 ? 2 : 1); ++half) {
          const u32 inter = prmt(pc.vc[kt][hh][0][w], pc.vc[kt][hh][1][w], half ? 0x7632 : 0x5410);
          constexpr int per_half = 16 / VB;
#pragma unroll
          for (int j = 0; j < per_half; ++j) {
            const int e = w * (32 / VB) + half * per_half + j;
            va[hh][e] = hfma2(hadd2(code_field<VB>(inter, VB * j), field_offset_neg<VB>(VB * j)), sc, mn);
            if (STAGED) va[hh][e] &= keep;
          }
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt)
      mma16816(acc[mt], va[0][2 * mt], va[0][2 * mt + 1], va[1][2 * mt], va[1][2 * mt + 1], pb[kt][0], pb[kt][1]);
  }
}

// One page pass (tokens t0 .. t0 + T - 1) into the running softmax state of row g.  QKB: key bits of the
// format (the query's channel order, key_channel<QKB, D>); CKB / VB: bits of this page's codes.  STAGED: the
// 8-bit own page -- keys per token and 64-channel group (dequantized on the B operand in fp16), tokens
// >= n_valid (counted from t0) masked (their bytes may be stale); otherwise a full packed page (keys per
// channel, scale folded into the query).  LO: tokens < lo (counted from t0: the sliding window's start) are
// masked too; the pass holds at least one token in [lo, n_valid).
template <int QKB, int CKB, int VB, bool STAGED, bool LO, int D, bool LATE = false>
__device__ __forceinline__ void attend_page(const u8* page, int t0, int n_valid, int lo, const u32 (&qs)[D / 8],
                                            float& m_run, float& l_run, float (&acc)[D / 16][4], int g, int qd,
                                            int k_meta_off, int v_codes_off, int v_meta_off) {
  constexpr int T = HeadShape<D>::T, NK = HeadShape<D>::NK;
  PageCodes<CKB, VB, D> pc;
  if constexpr (!LATE) pc.load(page, t0, g, qd, v_codes_off, v_meta_off);

  float s[T / 8][4];
  if (!STAGED) {
    // ---- S = Q' K^T + (sum_c Q m - sum_c offset Q'), Q' = Q * per-channel scale
    u32 km[D / 4], qp[D / 8];
    scale_query<QKB, D>(page, k_meta_off, qd, qs, km, qp);
    float corr[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int kk = 0; kk < NK; ++kk) {
      const int a = 2 * kk, bb = 2 * kk + 1;
      mma16816(corr, qs[a], 0u, qs[bb], 0u, key_min_pair<QKB, D>(km, qd, a), key_min_pair<QKB, D>(km, qd, bb));
      constexpr int per_word = 16 / CKB;  // -offset of each channel pair's code field (the codes' offsets)
      mma16816(corr, qp[a], 0u, qp[bb], 0u, field_offset_neg<CKB>(CKB * (a % per_word)),
               field_offset_neg<CKB>(CKB * (bb % per_word)));
    }
#pragma unroll
    for (int nt = 0; nt < T / 8; ++nt) {
      if constexpr (LATE) PageCodes<CKB, VB, D>::load_key_row(page, t0 + 8 * nt + g, qd, pc.kc[nt]);
#pragma unroll
      for (int kk = 0; kk < NK; ++kk) {
        constexpr int per_word = 16 / CKB;
        const int a = 2 * kk, bb = 2 * kk + 1;
        const u32 b0 = code_field<CKB>(pc.kc[nt][a / per_word], CKB * (a % per_word));
        const u32 b1 = code_field<CKB>(pc.kc[nt][bb / per_word], CKB * (bb % per_word));
        if (kk == 0)
          mma16816_c(s[nt], qp[a], 0u, qp[bb], 0u, b0, b1, corr);
        else
          mma16816(s[nt], qp[a], 0u, qp[bb], 0u, b0, b1);
      }
    }
  } else {
    // ---- S = Q K^T with 8-bit keys dequantized per token: channels of pair pi in the query's order
#pragma unroll
    for (int nt = 0; nt < T / 8; ++nt) {
      u32 w[HeadShape<D>::NKG];
      staged_key_meta<D>(page, k_meta_off, t0 + 8 * nt + g, qd, w);
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < NK; ++kk)
        mma16816(s[nt], qs[2 * kk], 0u, qs[2 * kk + 1], 0u, staged_key_pair<QKB, D>(pc.kc[nt], qd, 2 * kk, w),
                 staged_key_pair<QKB, D>(pc.kc[nt], qd, 2 * kk + 1, w));
      if (8 * nt + 2 * qd >= n_valid) s[nt][0] = KVMIX_NEG_INF;
      if (8 * nt + 2 * qd + 1 >= n_valid) s[nt][1] = KVMIX_NEG_INF;
    }
  }
  if (LO) {
#pragma unroll
    for (int nt = 0; nt < T / 8; ++nt) {
      if (8 * nt + 2 * qd < lo) s[nt][0] = KVMIX_NEG_INF;
      if (8 * nt + 2 * qd + 1 < lo) s[nt][1] = KVMIX_NEG_INF;
    }
  }

  // ---- online softmax (base 2) for row g; the quad (qd = 0..3) shares the row
  float mx = KVMIX_NEG_INF;
#pragma unroll
  for (int nt = 0; nt < T / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][0], s[nt][1]));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  const float m_new = fmaxf(m_run, mx);
  const float alpha = ex2(m_run - m_new);
  float psum = 0.f;
  u32 pb[T / 16][2];
#pragma unroll
  for (int nt = 0; nt < T / 8; ++nt) {
    const float p0 = ex2(s[nt][0] - m_new), p1 = ex2(s[nt][1] - m_new);
    psum += p0 + p1;
    pb[nt >> 1][nt & 1] = pack_f16x2(p0, p1);
  }
  l_run = l_run * alpha + psum;
  m_run = m_new;
  // acc columns are heads 2 qd, 2 qd + 1: their rescale factors live in lanes 8 qd and 8 qd + 4
  const float al0 = __shfl_sync(0xffffffffu, alpha, 8 * qd);
  const float al1 = __shfl_sync(0xffffffffu, alpha, 8 * qd + 4);
#pragma unroll
  for (int mt = 0; mt < D / 16; ++mt) {
    acc[mt][0] *= al0; acc[mt][1] *= al1; acc[mt][2] *= al0; acc[mt][3] *= al1;
  }

  if constexpr (LATE) pc.load_values(page, t0, g, qd, v_codes_off, v_meta_off);
  add_values<CKB, VB, STAGED, D>(pc, pb, n_valid, qd, acc);
}

__device__ __forceinline__ u32 movmatrix_t(u32 x) {  // 8 x 8 fp16 tile (row lane / 4, cols 2 (lane % 4), + 1) transposed
  u32 r;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(x));
  return r;
}

// attend_page with S transposed (served for 4-bit keys): S^T = K Q'^T, A = key codes (rows = tokens 16 mt + g and
// 16 mt + 8 + g: the thread's words of kc[2 mt] and kc[2 mt + 1]), B = the query pair of head g; the thread
// holds heads 2 qd, 2 qd + 1 of T / 8 tokens, so the softmax state is per (thread, head i = 0, 1) and the maxima
// are reduced over g (lanes 4, 8, 16 apart).  P^T tiles transposed by movmatrix are the value mma's B.
template <int QKB, int CKB, int VB, bool STAGED, bool LO, int D, bool LATE = false>
__device__ __forceinline__ void attend_page_st(const u8* page, int t0, int n_valid, int lo, const u32 (&qs)[D / 8],
                                               float (&m_run)[2], float (&l_run)[2], float (&acc)[D / 16][4], int g,
                                               int qd, int k_meta_off, int v_codes_off, int v_meta_off) {
  constexpr int T = HeadShape<D>::T, NK = HeadShape<D>::NK;
  PageCodes<CKB, VB, D> pc;
  if constexpr (!LATE) pc.load(page, t0, g, qd, v_codes_off, v_meta_off);

  float st[T / 16][4];  // [mt]: (token 16 mt + g: heads 2 qd, 2 qd + 1), (token 16 mt + 8 + g: same heads)
  if (!STAGED) {
    // ---- S^T = K Q'^T + (sum_c Q m - sum_c offset Q') per head (all token rows alike)
    u32 km[D / 4], qp[D / 8];
    scale_query<QKB, D>(page, k_meta_off, qd, qs, km, qp);
    float corr[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int kk = 0; kk < NK; ++kk) {
      const int a = 2 * kk, bb = 2 * kk + 1;
      const u32 m0 = key_min_pair<QKB, D>(km, qd, a), m1 = key_min_pair<QKB, D>(km, qd, bb);
      mma16816(corr, m0, m0, m1, m1, qs[a], qs[bb]);
      constexpr int pw = 16 / CKB;
      const u32 na = field_offset_neg<CKB>(CKB * (a % pw)), nb = field_offset_neg<CKB>(CKB * (bb % pw));
      mma16816(corr, na, na, nb, nb, qp[a], qp[bb]);
    }
#pragma unroll
    for (int mt = 0; mt < T / 16; ++mt) {
      constexpr int KW = PageCodes<CKB, VB, D>::KW;
      u32 kr[2][KW];  // key rows of tokens 16 mt + g, 16 mt + 8 + g
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if constexpr (LATE) PageCodes<CKB, VB, D>::load_key_row(page, t0 + 16 * mt + 8 * h + g, qd, pc.kc[2 * mt + h]);
#pragma unroll
        for (int i = 0; i < KW; ++i) kr[h][i] = pc.kc[2 * mt + h][i];
      }
#pragma unroll
      for (int kk = 0; kk < NK; ++kk) {
        constexpr int per_word = 16 / CKB;
        const int a = 2 * kk, bb = 2 * kk + 1;
        const u32 a0 = code_field<CKB>(kr[0][a / per_word], CKB * (a % per_word));
        const u32 a1 = code_field<CKB>(kr[1][a / per_word], CKB * (a % per_word));
        const u32 a2 = code_field<CKB>(kr[0][bb / per_word], CKB * (bb % per_word));
        const u32 a3 = code_field<CKB>(kr[1][bb / per_word], CKB * (bb % per_word));
        if (kk == 0)
          mma16816_c(st[mt], a0, a1, a2, a3, qp[a], qp[bb], corr);
        else
          mma16816(st[mt], a0, a1, a2, a3, qp[a], qp[bb]);
      }
    }
  } else {
    // ---- S^T with 8-bit keys dequantized per token (rows): channels of pair pi in the query's order
#pragma unroll
    for (int mt = 0; mt < T / 16; ++mt) {
      u32 w[2][HeadShape<D>::NKG];
#pragma unroll
      for (int h = 0; h < 2; ++h) staged_key_meta<D>(page, k_meta_off, t0 + 16 * mt + 8 * h + g, qd, w[h]);
      st[mt][0] = st[mt][1] = st[mt][2] = st[mt][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < NK; ++kk) {
        u32 ak[2][2];  // [token row h][pair r]
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int r = 0; r < 2; ++r)
            ak[h][r] = staged_key_pair<QKB, D>(pc.kc[2 * mt + h], qd, 2 * kk + r, w[h]);
        mma16816(st[mt], ak[0][0], ak[1][0], ak[0][1], ak[1][1], qs[2 * kk], qs[2 * kk + 1]);
      }
      if (16 * mt + g >= n_valid) st[mt][0] = st[mt][1] = KVMIX_NEG_INF;
      if (16 * mt + 8 + g >= n_valid) st[mt][2] = st[mt][3] = KVMIX_NEG_INF;
    }
  }
  if (LO) {
#pragma unroll
    for (int mt = 0; mt < T / 16; ++mt) {
      if (16 * mt + g < lo) st[mt][0] = st[mt][1] = KVMIX_NEG_INF;
      if (16 * mt + 8 + g < lo) st[mt][2] = st[mt][3] = KVMIX_NEG_INF;
    }
  }

  // ---- online softmax (base 2) for heads 2 qd + i; the 8 lanes of one qd share them
  float mx[2] = {KVMIX_NEG_INF, KVMIX_NEG_INF};
#pragma unroll
  for (int mt = 0; mt < T / 16; ++mt) {
    mx[0] = fmaxf(mx[0], fmaxf(st[mt][0], st[mt][2]));
    mx[1] = fmaxf(mx[1], fmaxf(st[mt][1], st[mt][3]));
  }
  float alpha[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], o));
    const float m_new = fmaxf(m_run[i], mx[i]);
    alpha[i] = ex2(m_run[i] - m_new);
    m_run[i] = m_new;
  }
  float psum[2] = {0.f, 0.f};
  u32 pb[T / 16][2];
#pragma unroll
  for (int mt = 0; mt < T / 16; ++mt) {
    const float p00 = ex2(st[mt][0] - m_run[0]), p01 = ex2(st[mt][1] - m_run[1]);
    const float p10 = ex2(st[mt][2] - m_run[0]), p11 = ex2(st[mt][3] - m_run[1]);
    psum[0] += p00 + p10;
    psum[1] += p01 + p11;
    pb[mt][0] = movmatrix_t(pack_f16x2(p00, p01));  // -> head g, tokens 16 mt + 2 qd, + 1
    pb[mt][1] = movmatrix_t(pack_f16x2(p10, p11));  // -> head g, tokens 16 mt + 8 + 2 qd, + 1
  }
  l_run[0] = l_run[0] * alpha[0] + psum[0];
  l_run[1] = l_run[1] * alpha[1] + psum[1];
#pragma unroll
  for (int mt = 0; mt < D / 16; ++mt) {  // acc columns are this thread's heads 2 qd, 2 qd + 1
    acc[mt][0] *= alpha[0]; acc[mt][1] *= alpha[1]; acc[mt][2] *= alpha[0]; acc[mt][3] *= alpha[1];
  }

  if constexpr (LATE) pc.load_values(page, t0, g, qd, v_codes_off, v_meta_off);
  add_values<CKB, VB, STAGED, D>(pc, pb, n_valid, qd, acc);
}

// A packed page pass (HeadShape<D>::T tokens) as a warp's ring holds it: key codes of the pass's tokens, the page's
// per-channel key meta, value codes and value meta of the pass's tokens (cuda_decode.pass_bytes mirrors BYTES).
template <int KB, int VB, int D>
struct PassLayout {
  static constexpr int T = HeadShape<D>::T;
  static constexpr int K_CODES = T * D * KB / 8;
  static constexpr int K_META = K_CODES;  // offsets in the ring's pass
  static constexpr int V_CODES = K_META + D * 4;
  static constexpr int V_META = V_CODES + T * D * VB / 8;
  static constexpr int BYTES = V_META + T * (D / 64) * 4;
  static_assert(K_CODES % 16 == 0 && V_CODES % 16 == 0 && V_META % 16 == 0 && BYTES % 16 == 0, "16-byte copies");
};

__device__ __forceinline__ void cp_async16(u8* dst, const u8* src) {
  const u32 s = (u32)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(src));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// N bytes (a multiple of 16) from global src to shared dst, 16 per lane and instruction.
template <int N>
__device__ __forceinline__ void copy_async(u8* dst, const u8* src, int lane) {
  constexpr int C = N / 16;
#pragma unroll
  for (int j = 0; j < (C + 31) / 32; ++j) {
    const int i = 32 * j + lane;
    if (C % 32 == 0 || i < C) cp_async16(dst + 16 * i, src + 16 * i);
  }
}

// The pass of tokens t0 .. t0 + T - 1 of a packed page in the cache into a ring buffer (PassLayout).
template <int KB, int VB, int D>
__device__ __forceinline__ void copy_pass(u8* buf, const u8* page, int t0, int lane, int k_meta_off,
                                          int v_codes_off, int v_meta_off) {
  using PL = PassLayout<KB, VB, D>;
  constexpr int T = PL::T;
  copy_async<PL::K_CODES>(buf, page + t0 * (D * KB / 8), lane);
  copy_async<D * 4>(buf + PL::K_META, page + k_meta_off, lane);
  copy_async<T * D * VB / 8>(buf + PL::V_CODES, page + v_codes_off + t0 * (D * VB / 8), lane);
  copy_async<T * (D / 64) * 4>(buf + PL::V_META, page + v_meta_off + t0 * (D / 64) * 4, lane);
}

// The S layout of a format's key width: transposed for 4-bit keys (see the note at the top).
__host__ __device__ constexpr bool s_transposed(int key_bits) { return key_bits == 4; }

// One page pass into the softmax state (m_run, l_run per the layout: attend_page uses [0], head g).
template <int QKB, int CKB, int VB, bool STAGED, bool LO, int D, bool LATE = false>
__device__ __forceinline__ void attend(const u8* page, int t0, int n_valid, int lo, const u32 (&qs)[D / 8],
                                       float (&m_run)[2], float (&l_run)[2], float (&acc)[D / 16][4], int g, int qd,
                                       int k_meta_off, int v_codes_off, int v_meta_off) {
  if constexpr (s_transposed(QKB))
    attend_page_st<QKB, CKB, VB, STAGED, LO, D, LATE>(page, t0, n_valid, lo, qs, m_run, l_run, acc, g, qd, k_meta_off,
                                                v_codes_off, v_meta_off);
  else
    attend_page<QKB, CKB, VB, STAGED, LO, D, LATE>(page, t0, n_valid, lo, qs, m_run[0], l_run[0], acc, g, qd, k_meta_off,
                                             v_codes_off, v_meta_off);
}

// One page (64 tokens: passes of T) into the softmax state: tokens [lo, n_valid) of it (WINDOW: lo = the window's
// start counted from the page's first token, > 0 on the window's first page only).  Passes without a token in
// that range are skipped, so every softmax update sees at least one unmasked score.
template <int QKB, int CKB, int VB, bool STAGED, bool WINDOW, int D>
__device__ __forceinline__ void attend_tokens(const u8* page, int n_valid, int lo, const u32 (&qs)[D / 8],
                                              float (&m_run)[2], float (&l_run)[2], float (&acc)[D / 16][4], int g,
                                              int qd, int k_meta_off, int v_codes_off, int v_meta_off) {
  constexpr int T = HeadShape<D>::T;
  if constexpr (T == KVMIX_P) {
    if (WINDOW && lo > 0)
      attend<QKB, CKB, VB, STAGED, true, D>(page, 0, n_valid, lo, qs, m_run, l_run, acc, g, qd, k_meta_off,
                                            v_codes_off, v_meta_off);
    else
      attend<QKB, CKB, VB, STAGED, false, D>(page, 0, n_valid, 0, qs, m_run, l_run, acc, g, qd, k_meta_off,
                                             v_codes_off, v_meta_off);
  } else {
#pragma unroll 1
    for (int t0 = WINDOW && lo > 0 ? lo / T * T : 0; t0 < n_valid; t0 += T) {  // lo < 0 past the first page
      if (WINDOW && lo > t0)
        attend<QKB, CKB, VB, STAGED, true, D>(page, t0, n_valid - t0, lo - t0, qs, m_run, l_run, acc, g, qd,
                                              k_meta_off, v_codes_off, v_meta_off);
      else
        attend<QKB, CKB, VB, STAGED, false, D>(page, t0, n_valid - t0, 0, qs, m_run, l_run, acc, g, qd, k_meta_off,
                                               v_codes_off, v_meta_off);
    }
  }
}

// The launch's arguments, passed by value as one struct: vllm_kvmix.kernels.cuda_decode.DecodeParams mirrors
// it field for field (tests/test_page_kernels.py compares the two).  Integers are 32-bit; offsets are formed
// in 64 bits.
struct DecodeParams {
  const u16* q;
  const u16* key;
  const u16* value;
  const u8* cache;
  u8* stage;
  const int* slots;
  const int* block_table;
  const int* qsl;
  const int* seq_lens;
  const int* qb_req;
  float* ws_acc;
  float* ws_ml;
  int* counters;
  u16* out;
  int num_splits;
  int stage_new;
  double scale_log2e;
  int stride_qt;
  int stride_qh;
  int stride_kt;
  int stride_kh;
  int stride_vt;
  int stride_vh;
  int stride_ot;
  int stride_oh;
  int stride_cb;
  int stride_ch;
  int stride_bt;
  int rep;
  int k_meta_off;
  int v_codes_off;
  int v_meta_off;
  int stride_ss;
  int stride_sh;
  int sk_meta_off;
  int sv_codes_off;
  int sv_meta_off;
  int window;  // sliding window in tokens (WINDOW instantiations): keys at positions >= seq - window
};

template <int KB, int VB, int NW, bool BF16, int D, bool WINDOW>
__global__ void __launch_bounds__(NW * 32, HeadShape<D>::MIN_BLOCKS) kvmix_page_decode(const DecodeParams args) {
  using HS = HeadShape<D>;
  const u16* __restrict__ q = args.q;
  const u16* __restrict__ key = args.key;
  const u16* __restrict__ value = args.value;
  const u8* __restrict__ cache = args.cache;
  u8* stage = args.stage;
  const int* __restrict__ slots = args.slots;
  const int* __restrict__ block_table = args.block_table;
  const int* __restrict__ qsl = args.qsl;
  const int* __restrict__ seq_lens = args.seq_lens;
  const int* __restrict__ qb_req = args.qb_req;
  float* ws_acc = args.ws_acc;
  float* ws_ml = args.ws_ml;
  int* counters = args.counters;
  u16* __restrict__ out = args.out;
  const int num_splits = args.num_splits, stage_new = args.stage_new;
  const double scale_log2e_d = args.scale_log2e;
  const int stride_qt = args.stride_qt, stride_qh = args.stride_qh, stride_kt = args.stride_kt, stride_kh = args.stride_kh;
  const int stride_vt = args.stride_vt, stride_vh = args.stride_vh, stride_ot = args.stride_ot, stride_oh = args.stride_oh;
  const int stride_cb = args.stride_cb, stride_ch = args.stride_ch, stride_bt = args.stride_bt, rep = args.rep;
  const int k_meta_off = args.k_meta_off, v_codes_off = args.v_codes_off, v_meta_off = args.v_meta_off;
  const int stride_ss = args.stride_ss, stride_sh = args.stride_sh;
  const int sk_meta_off = args.sk_meta_off, sv_codes_off = args.sv_codes_off, sv_meta_off = args.sv_meta_off;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, qd = lane & 3;
  // query block = one request's token; blockIdx.y = (KV head, chunk of <= KVMIX_ROWS of its rep query heads)
  const int qb = blockIdx.x, pair = blockIdx.y, split = blockIdx.z;
  const int chunks = (rep + KVMIX_ROWS - 1) / KVMIX_ROWS;
  const int kvh = pair / chunks, head0 = kvh * rep + (pair - kvh * chunks) * KVMIX_ROWS;  // row g: head head0 + g
  const int rows = min(KVMIX_ROWS, kvh * rep + rep - head0);
  const int b = qb_req[qb];
  const int num_pairs = gridDim.y;
  const float scale_log2e = (float)scale_log2e_d;

  __shared__ float sm_m[NW][KVMIX_ROWS], sm_l[NW][KVMIX_ROWS];
  // dynamic shared memory (cuda_decode.smem_bytes): the warps' rings of packed page passes, then, after the page
  // loop, the warps' acc fragments for the merge (sm_acc)
  extern __shared__ __align__(16) u8 smem_dyn[];
  float(*sm_acc)[KVMIX_ROWS][D + 4] = reinterpret_cast<float(*)[KVMIX_ROWS][D + 4]>(smem_dyn);
  __shared__ float sm_w[KVMIX_MAX_SPLITS][KVMIX_ROWS];  // last block of a split row: per (split, head) weights
  __shared__ int sm_last;

  const int q0 = qsl[b], q1 = qsl[b + 1];
  if (q1 == q0) return;  // a padded row (CUDA-graph batch): no token, nothing to read or write
  const int seq = seq_lens[b];
  // pages [0, own) packed, page `own` from the staging slot
  const int own = (seq - 1) / KVMIX_P;
  const int n_pages = own + 1;
  const int lo = WINDOW ? max(seq - args.window, 0) : 0;  // the first key position attended
  const int p_first = lo / KVMIX_P;
#if KVMIX_MIN_SPLIT_PAGES > 0
  const int per = max((n_pages - p_first + num_splits - 1) / num_splits, WINDOW ? 1 : KVMIX_MIN_SPLIT_PAGES);
  const int n_merged = (n_pages - p_first + per - 1) / per;  // the splits with pages; the others exit here
  if (num_splits > 1 && split >= n_merged) return;
#else
  const int per = (n_pages - p_first + num_splits - 1) / num_splits;
  const int n_merged = num_splits;  // splits whose partials the last block merges: every one
#endif
  const int p_begin = p_first + split * per;
  const int p_end = min(n_pages, p_begin + per);
  u8* own_page = stage + (long long)slots[b] * stride_ss + (long long)kvh * stride_sh;

  // ---- RING: this warp's packed pages p = p_begin + warp + NW i < min(p_end, own), read in units of one pass
  // (PASSES a page) through its ring of KVMIX_RING_STAGES passes; the first STAGES - 1 units are copied now
  using PL = PassLayout<KB, VB, D>;
  constexpr int PASSES = KVMIX_P / HS::T, STAGES = KVMIX_RING_STAGES;
  {
    u32 dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    if (dyn < (u32)max(HS::RING ? NW * STAGES * PL::BYTES : 0, NW * KVMIX_ROWS * (D + 4) * 4)) __trap();  // launcher
  }
  u8* ring = smem_dyn + warp * STAGES * PL::BYTES;
  const int p_stop = min(p_end, own);
  const int n_units = p_begin + warp < p_stop ? (p_stop - p_begin - warp + NW - 1) / NW * PASSES : 0;
  const int* bt_row = block_table + (long long)b * stride_bt;
  auto unit_page = [&](int u) { return p_begin + warp + NW * (u / PASSES); };  // the page of this warp's unit u
  auto copy_unit = [&](int u) {
    const u8* page = cache + (long long)bt_row[unit_page(u)] * stride_cb + (long long)kvh * stride_ch;
    copy_pass<KB, VB, D>(ring + (u % STAGES) * PL::BYTES, page, (u % PASSES) * HS::T, lane, k_meta_off, v_codes_off,
                         v_meta_off);
  };
  if constexpr (HS::RING) {
#pragma unroll
    for (int u = 0; u < STAGES - 1; ++u) {
      if (u < n_units) copy_unit(u);
      cp_async_commit();
    }
  }

  // ---- the new token into the staging slot (warp 0: key, warp 1: value), before any warp reads the page
  if (stage_new && own >= p_begin && own < p_end) {
    if (warp < 2) {
      const u16* src = warp == 0 ? key + (long long)q0 * stride_kt + (long long)kvh * stride_kh
                                 : value + (long long)q0 * stride_vt + (long long)kvh * stride_vh;
      float x[HS::LC];
#pragma unroll
      for (int i = 0; i < HS::LC; ++i) x[i] = in_to_f32<BF16>(src[HS::LC * lane + i]);
      if (warp == 1) fwht<D>(x, lane);
      const int off = seq - 1 - own * KVMIX_P;
      if (warp == 0)
        stage_row<D, KVMIX_SKG>(own_page, off, x, lane, 0, sk_meta_off);
      else
        stage_row<D, 64>(own_page, off, x, lane, sv_codes_off, sv_meta_off);
    }
    __syncthreads();
  }

  // ---- the query as A fragments (row g = head kvh * rep + g), scaled by softmax scale * log2(e)
  u32 qs[HS::QP];
  {
    const bool row_ok = g < rows;
    const long long qoff = (long long)q0 * stride_qt + (long long)(head0 + g) * stride_qh;
#pragma unroll
    for (int pi = 0; pi < HS::QP; ++pi) {
      float lo = 0.f, hi = 0.f;
      if (row_ok) {
        lo = load_q<BF16>(q, qoff + key_channel<KB, D>(qd, pi, 0)) * scale_log2e;
        hi = load_q<BF16>(q, qoff + key_channel<KB, D>(qd, pi, 1)) * scale_log2e;
        lo = fminf(fmaxf(lo, -65504.f), 65504.f);
        hi = fminf(fmaxf(hi, -65504.f), 65504.f);
      }
      qs[pi] = pack_f16x2(lo, hi);
    }
  }

  // softmax state: heads 2 qd, 2 qd + 1 with S transposed (4-bit keys); head g in [0] with S = Q K^T
  float m_run[2] = {KVMIX_NEG_INF, KVMIX_NEG_INF}, l_run[2] = {0.f, 0.f};
  float acc[HS::VMT][4];
#pragma unroll
  for (int mt = 0; mt < HS::VMT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f;

  if constexpr (HS::RING) {
    for (int u = 0; u < n_units; ++u) {
      if (u + STAGES - 1 < n_units) copy_unit(u + STAGES - 1);
      cp_async_commit();  // (empty groups keep the count uniform)
      cp_async_wait<STAGES - 1>();
      __syncwarp();  // unit u's bytes, copied by every lane, visible to the warp
      const u8* buf = ring + (u % STAGES) * PL::BYTES;
      const int t0 = (u % PASSES) * HS::T;
      const int pass_lo = WINDOW ? lo - unit_page(u) * KVMIX_P - t0 : 0;  // > 0: the window starts in the pass
      if (!WINDOW || pass_lo <= 0)
        attend<KB, KB, VB, false, false, D, true>(buf, 0, HS::T, 0, qs, m_run, l_run, acc, g, qd, PL::K_META,
                                                  PL::V_CODES, PL::V_META);
      else if (pass_lo < HS::T)
        attend<KB, KB, VB, false, true, D, true>(buf, 0, HS::T, pass_lo, qs, m_run, l_run, acc, g, qd, PL::K_META,
                                                 PL::V_CODES, PL::V_META);
      __syncwarp();  // every lane done with the buffer before it is copied into again
    }
    // the request's own page: the 8-bit staged copy, tokens [0, seq - own * 64), read in place
    if (own >= p_begin + warp && own < p_end && (own - p_begin - warp) % NW == 0)
      attend_tokens<KB, 8, 8, true, WINDOW, D>(own_page, seq - own * KVMIX_P, WINDOW ? lo - own * KVMIX_P : 0, qs,
                                               m_run, l_run, acc, g, qd, sk_meta_off, sv_codes_off, sv_meta_off);
  } else {  // every page straight from the cache / the staging slot into registers
    for (int p = p_begin + warp; p < p_end; p += NW) {
      const int page_lo = WINDOW ? lo - p * KVMIX_P : 0;  // > 0 on the window's first page only
      if (p == own) {  // the request's own page: the 8-bit staged copy, tokens [0, seq - own * 64)
        attend_tokens<KB, 8, 8, true, WINDOW, D>(own_page, seq - own * KVMIX_P, page_lo, qs, m_run, l_run, acc, g,
                                                 qd, sk_meta_off, sv_codes_off, sv_meta_off);
      } else {
        const long long blk = block_table[(long long)b * stride_bt + p];
        attend_tokens<KB, KB, VB, false, WINDOW, D>(cache + blk * (long long)stride_cb + (long long)kvh * stride_ch,
                                                    KVMIX_P, page_lo, qs, m_run, l_run, acc, g, qd, k_meta_off,
                                                    v_codes_off, v_meta_off);
      }
    }
  }
  if constexpr (HS::RING) {
    cp_async_wait<0>();
    __syncthreads();  // sm_acc overlays the rings
  }

  // ---- merge the warps: each head's (max, sum) and acc fragments into shared memory
  if constexpr (s_transposed(KB)) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int o = 4; o < 32; o <<= 1) l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], o);
      if (g == 0) {
        sm_m[warp][2 * qd + i] = m_run[i];
        sm_l[warp][2 * qd + i] = l_run[i];
      }
    }
  } else {
    l_run[0] += __shfl_xor_sync(0xffffffffu, l_run[0], 1);
    l_run[0] += __shfl_xor_sync(0xffffffffu, l_run[0], 2);
    if (qd == 0) {
      sm_m[warp][g] = m_run[0];
      sm_l[warp][g] = l_run[0];
    }
  }
#pragma unroll
  for (int mt = 0; mt < HS::VMT; ++mt) {
    const int c = HS::VC * g + 2 * mt;
    sm_acc[warp][2 * qd][c] = acc[mt][0];
    sm_acc[warp][2 * qd + 1][c] = acc[mt][1];
    sm_acc[warp][2 * qd][c + 1] = acc[mt][2];
    sm_acc[warp][2 * qd + 1][c + 1] = acc[mt][3];
  }
  __syncthreads();
  // this block's (max, sum, acc) per (head r, channel c); acc lands in sm_acc[0] (each thread its own cells)
  const long long base = ((long long)qb * num_pairs + pair) * num_splits;  // + split: the workspace row block
  for (int i = threadIdx.x; i < rows * D; i += NW * 32) {
    const int r = i / D, c = i % D;
    float M = KVMIX_NEG_INF;
#pragma unroll
    for (int w = 0; w < NW; ++w) M = fmaxf(M, sm_m[w][r]);
    float A = 0.f, L = 0.f;
    if (M != KVMIX_NEG_INF) {
#pragma unroll
      for (int w = 0; w < NW; ++w) {
        const float f = ex2(sm_m[w][r] - M);
        A += sm_acc[w][r][c] * f;
        L += sm_l[w][r] * f;
      }
    }
    if (num_splits == 1) {
      sm_acc[0][r][c] = L > 0.f ? A / L : 0.f;
    } else {
      const long long row = (base + split) * KVMIX_ROWS + r;
      ws_acc[row * D + c] = A;
      if (c == 0) {
        ws_ml[row * 2] = M;  // base-2 units; -inf stays -inf
        ws_ml[row * 2 + 1] = L;
      }
    }
  }

  if (num_splits > 1) {
    // ---- the last block of (row, KV head) to finish merges every split's partial
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) sm_last = atomicAdd(counters + (long long)qb * num_pairs + pair, 1) == n_merged - 1;
    __syncthreads();
    if (!sm_last) return;
    __threadfence();
    // warp w: heads w, w + NW; lanes over splits -> the global max, each split's weight, the sum
    for (int r = warp; r < rows; r += NW) {
      float M = KVMIX_NEG_INF;
      for (int sp = lane; sp < n_merged; sp += 32) M = fmaxf(M, __ldcg(ws_ml + ((base + sp) * KVMIX_ROWS + r) * 2));
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
      float L = 0.f;
      for (int sp = lane; sp < n_merged; sp += 32) {
        const float f = M == KVMIX_NEG_INF ? 0.f : ex2(__ldcg(ws_ml + ((base + sp) * KVMIX_ROWS + r) * 2) - M);
        sm_w[sp][r] = f;
        L += f * __ldcg(ws_ml + ((base + sp) * KVMIX_ROWS + r) * 2 + 1);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) L += __shfl_xor_sync(0xffffffffu, L, o);
      if (lane == 0) sm_l[0][r] = L > 0.f ? 1.f / L : 0.f;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < rows * (D / 4); i += NW * 32) {  // 4 channels per thread
      const int r = i / (D / 4), c = 4 * (i % (D / 4));
      float4 A;
      A.x = A.y = A.z = A.w = 0.f;
#pragma unroll 8
      for (int sp = 0; sp < n_merged; ++sp) {
        const float f = sm_w[sp][r];
        const float4 v = __ldcg(reinterpret_cast<const float4*>(ws_acc + ((base + sp) * KVMIX_ROWS + r) * D + c));
        A.x += f * v.x; A.y += f * v.y; A.z += f * v.z; A.w += f * v.w;
      }
      const float inv = sm_l[0][r];
      sm_acc[0][r][c] = A.x * inv; sm_acc[0][r][c + 1] = A.y * inv;
      sm_acc[0][r][c + 2] = A.z * inv; sm_acc[0][r][c + 3] = A.w * inv;
    }
    if (threadIdx.x == 0) counters[(long long)qb * num_pairs + pair] = 0;  // ready for the next launch
  }
  __syncthreads();

  // ---- rotate back (values were stored rotated) and store: warp w, heads w, w + NW
  for (int r = warp; r < rows; r += NW) {
    float x[HS::LC];
#pragma unroll
    for (int i = 0; i < HS::LC; ++i) x[i] = sm_acc[0][r][HS::LC * lane + i];
    fwht<D>(x, lane);
    u32* dst = reinterpret_cast<u32*>(out + (long long)q0 * stride_ot + (long long)(head0 + r) * stride_oh +
                                      HS::LC * lane);
#pragma unroll
    for (int i = 0; i < HS::LC / 2; ++i)
      dst[i] = (u32)f32_to_out<BF16>(x[2 * i]) | ((u32)f32_to_out<BF16>(x[2 * i + 1]) << 16);
  }
}

// nvcc builds (tests/test_page_kernels.py, SASS inspection): the variants NVRTC instantiates by name at run time.
#ifdef KVMIX_INSTANTIATE
#define KVMIX_VARIANT(KB, VB, BF16, D, WINDOW) \
  template __global__ void kvmix_page_decode<KB, VB, 4, BF16, D, WINDOW>(const DecodeParams);
#define KVMIX_HEAD_SIZE(D) KVMIX_VARIANT(4, 2, false, D, false) KVMIX_VARIANT(4, 2, true, D, false) \
  KVMIX_VARIANT(4, 4, true, D, false) KVMIX_VARIANT(8, 4, true, D, false)
KVMIX_HEAD_SIZE(128)
KVMIX_HEAD_SIZE(64)
KVMIX_HEAD_SIZE(256)
// sliding-window layers (Gemma-3: head size 256; either S layout)
KVMIX_VARIANT(4, 2, true, 256, true)
KVMIX_VARIANT(8, 4, true, 128, true)
#endif
