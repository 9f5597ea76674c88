// lmforge native decode step: one or a few new tokens per row through a Llama-style model (RoPE, RMSNorm, SwiGLU,
// grouped-query attention, no biases), fp32 on CPU. Built on first use by lmforge/infer/native.py.
//
// Why C++: at batch 1 a small model's decode step is about 25 tensor calls per layer from Python, and each costs
// microseconds of dispatch, which is more than the arithmetic. Here every matmul goes through a packed-panel
// kernel that reads each weight once for all rows of the step (one row at batch 1, several for batches and
// speculative verification), and everything between them -- RMSNorm, RoPE, the cache write, attention, SiLU*up --
// is a plain loop over a few hundred floats. The math is the same as Transformer.forward (and
// lmforge.infer.fastpath): tests compare the logits to 1e-5.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#include <limits>
#include <vector>

namespace {

// out = x * rsqrt(mean(x^2) + eps) * w over rows of length D (sum of squares in double: no drift with D)
void rms_norm(const float* x, const float* w, float* out, int64_t rows, int64_t D, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * D;
    float* o = out + r * D;
    double ss = 0.0;
    for (int64_t i = 0; i < D; ++i) ss += (double)xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt((float)(ss / D) + eps);
    for (int64_t i = 0; i < D; ++i) o[i] = (xr[i] * inv) * w[i];
  }
}

// x*cos + rotate_half(x)*sin for one head (sin carries rotate_half's sign), times `scale`, written to out
inline void rope_head(const float* x, const float* cos, const float* sin, float scale, float* out, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) {
    out[i] = (x[i] * cos[i] + x[i + half] * sin[i]) * scale;
    out[i + half] = (x[i + half] * cos[i + half] + x[i] * sin[i + half]) * scale;
  }
}

// ---- small-M matmul on packed weights -----------------------------------------------------------------------
// A decode step multiplies a few rows (batch rows, or the K+1 positions of a speculative verify) by every weight
// matrix. MKL's sgemm at 2-16 rows is barely faster here than one GEMV per row, and its GEMV streams a large
// matrix more slowly than this kernel at one row. This kernel reads each weight once per step for all rows:
// weights are repacked into panels of 16 output columns, (P, K, 16) contiguous (zero-padded), so a panel streams
// sequentially from memory.
// Rows go in groups of up to 6: a 6x16 block of outputs is 12 AVX registers, which leaves room for the two weight
// vectors and the broadcast row value (16 in all), and each k costs 2 weight loads + 6 broadcasts for 12 FMAs.
// The first group of a panel streams it from DRAM (software prefetch ahead of the hardware's); later groups of
// the same panel find it in L1/L2.
constexpr int64_t PANEL = 16;
constexpr int64_t PREFETCH_K = 64;                        // rows of the panel ahead (64 x 64 B = 4 KiB)

at::Tensor pack_panels(const at::Tensor& w) {              // w: (K, N), the (in, out) operand, any strides
  const int64_t K = w.size(0), N = w.size(1), P = (N + PANEL - 1) / PANEL;
  at::Tensor packed = at::zeros({P, K, PANEL}, w.options().dtype(at::kFloat));
  at::Tensor src = w.to(at::kFloat);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t n0 = p * PANEL, n = std::min(PANEL, N - n0);
    packed[p].narrow(1, 0, n).copy_(src.narrow(1, n0, n));
  }
  return packed;
}

// rows [0, R) of x (row stride ldx) times one panel -> columns [0, ncols) of out (row stride ldo); acc: out +=
template <int R>
inline void panel_kernel(const float* x, int64_t ldx, const float* wp, int64_t K, float* out, int64_t ldo,
                         int64_t ncols, bool acc, bool prefetch) {
  float res[R][PANEL];
#if defined(__AVX2__) && defined(__FMA__)
  __m256 c[R][2];
  for (int r = 0; r < R; ++r) c[r][0] = c[r][1] = _mm256_setzero_ps();
  auto body = [&](int64_t k) {
    const float* w = wp + k * PANEL;
    const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k);
      c[r][0] = _mm256_fmadd_ps(xb, w0, c[r][0]);
      c[r][1] = _mm256_fmadd_ps(xb, w1, c[r][1]);
    }
  };
  if (prefetch) {
    for (int64_t k = 0; k < K; ++k) {
      _mm_prefetch((const char*)(wp + (k + PREFETCH_K) * PANEL), _MM_HINT_T0);
      body(k);
    }
  } else {
    for (int64_t k = 0; k < K; ++k) body(k);
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(res[r], c[r][0]);
    _mm256_storeu_ps(res[r] + 8, c[r][1]);
  }
#else
  (void)prefetch;
  for (int r = 0; r < R; ++r) std::fill(res[r], res[r] + PANEL, 0.0f);
  for (int64_t k = 0; k < K; ++k) {
    const float* w = wp + k * PANEL;
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * ldx + k];
#pragma omp simd
      for (int j = 0; j < PANEL; ++j) res[r][j] += xv * w[j];
    }
  }
#endif
  for (int r = 0; r < R; ++r) {
    float* o = out + r * ldo;
    if (acc) {
      for (int64_t j = 0; j < ncols; ++j) o[j] += res[r][j];
    } else {
      std::copy(res[r], res[r] + ncols, o);
    }
  }
}

// out (M, N) = x (M, K) @ W  (acc: out += x @ W); W given as pack_panels(W). x and out contiguous fp32.
void packed_mm(const at::Tensor& x, const at::Tensor& packed, int64_t N, at::Tensor& out, bool acc) {
  const int64_t M = x.size(0), K = x.size(1), P = packed.size(0);
  TORCH_CHECK(packed.size(1) == K && packed.size(2) == PANEL && (N + PANEL - 1) / PANEL == P, "packed shape");
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && out.size(0) == M && out.size(1) == N, "x/out shape");
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // a chunk of panels per task: enough work (~64k multiply-adds) to be worth a thread hand-off
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, M * K * PANEL));
  at::parallel_for(0, P, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const float* w = wp + p * K * PANEL;
      const int64_t n0 = p * PANEL, nc = std::min(PANEL, N - n0);
      int64_t m = 0;
      for (; m + 6 <= M; m += 6) panel_kernel<6>(xp + m * K, K, w, K, op + m * N + n0, N, nc, acc, m == 0);
      const bool first = m == 0;
      switch (M - m) {
        case 5: panel_kernel<5>(xp + m * K, K, w, K, op + m * N + n0, N, nc, acc, first); break;
        case 4: panel_kernel<4>(xp + m * K, K, w, K, op + m * N + n0, N, nc, acc, first); break;
        case 3: panel_kernel<3>(xp + m * K, K, w, K, op + m * N + n0, N, nc, acc, first); break;
        case 2: panel_kernel<2>(xp + m * K, K, w, K, op + m * N + n0, N, nc, acc, first); break;
        case 1: panel_kernel<1>(xp + m * K, K, w, K, op + m * N + n0, N, nc, acc, first); break;
        default: break;
      }
    }
  });
}

at::Tensor packed_mm_py(at::Tensor x, at::Tensor packed, int64_t N, c10::optional<at::Tensor> out) {
  at::Tensor o = out.has_value() ? *out : at::empty({x.size(0), N}, x.options());
  packed_mm(x.contiguous(), packed, N, o, out.has_value());
  return o;
}

}  // namespace

class NativeDecoder {
 public:
  // layers: 6 tensors per layer: attn_norm (D), W_qkv (D, (H+2Hkv)hd), W_o (H hd, D), ffn_norm (D),
  // W_gate_up (D, 2F), W_down (F, D); every W is the (in, out) operand of x @ W (any strides). Steps multiply
  // by packed copies of them (pack_panels).
  NativeDecoder(at::Tensor emb, std::vector<at::Tensor> layers, at::Tensor norm_w, at::Tensor head, int64_t n_head,
                int64_t n_kv_heads, int64_t head_dim, double eps)
      : emb_(emb), layers_(std::move(layers)), norm_w_(norm_w), head_(head), H_(n_head), Hkv_(n_kv_heads),
        hd_(head_dim), eps_((float)eps) {
    TORCH_CHECK(layers_.size() % 6 == 0, "6 tensors per layer");
    TORCH_CHECK(emb_.is_contiguous() && emb_.scalar_type() == at::kFloat, "embedding: contiguous fp32");
    TORCH_CHECK(H_ % Hkv_ == 0 && hd_ % 2 == 0, "bad head configuration");
    L_ = (int64_t)layers_.size() / 6;
    D_ = emb_.size(1);
    F_ = layers_[5].size(0);
    for (int64_t l = 0; l < L_; ++l) {
      TORCH_CHECK(layers_[6 * l].is_contiguous() && layers_[6 * l + 3].is_contiguous(), "norm weights");
    }
    TORCH_CHECK(norm_w_.is_contiguous(), "final norm weight");
  }

  // Packed weights made elsewhere (pack_panels of W_qkv, W_o, W_gate_up, W_down per layer, then the head), so a
  // caller can keep them across decoders of unchanged weights instead of packing again.
  void set_packed(std::vector<at::Tensor> layers, at::Tensor head) {
    TORCH_CHECK((int64_t)layers.size() == 4 * L_, "4 packed weights per layer");
    packed_ = std::move(layers);
    packed_head_ = head;
  }

  // Packs the weights (a second copy of them) unless set_packed handed them over.
  void ensure_packed() {
    if (!packed_.empty()) return;
    for (int64_t l = 0; l < L_; ++l)
      for (int i : {1, 2, 4, 5}) packed_.push_back(pack_panels(layers_[6 * l + i]));
    packed_head_ = pack_panels(head_);
  }

  // tokens (B, T) int64: T new tokens per row, at cache slots pos..pos+T-1; positions (B) int64, the RoPE
  // position of each row's first new token, or empty for `pos`; mask: (B, >= pos+T) bool with row stride, True =
  // real token (the new tokens must be True), or an empty tensor for no padding; K, V: (L, B, Hkv, max_len, hd)
  // contiguous fp32 caches; cos/sin: (P, hd) tables, sin with rotate_half's sign folded in. New token t of a row
  // attends to slots [0, pos+t] (causal among the new tokens). Returns logits (B*T, V), row b*T+t. The caller
  // advances the cache position.
  at::Tensor step(at::Tensor tokens, at::Tensor positions, at::Tensor mask, at::Tensor K, at::Tensor V, int64_t pos,
                  at::Tensor cos, at::Tensor sin) {
    TORCH_CHECK(tokens.dim() == 2 && tokens.is_contiguous() && tokens.scalar_type() == at::kLong,
                "tokens: contiguous int64 (B, T)");
    const int64_t B = tokens.size(0), T = tokens.size(1), M = B * T;
    const int64_t D = D_, H = H_, Hkv = Hkv_, hd = hd_, F = F_, S = pos + T;
    const int64_t NH = H + 2 * Hkv, g = H / Hkv, Smax = K.size(3);
    TORCH_CHECK(T >= 1, "at least one new token per row");
    TORCH_CHECK(K.is_contiguous() && V.is_contiguous() && K.scalar_type() == at::kFloat && K.sizes() == V.sizes() &&
                K.dim() == 5 && K.size(0) == L_ && K.size(1) == B && K.size(2) == Hkv && K.size(4) == hd &&
                S <= Smax, "KV cache: contiguous fp32 (L, B, Hkv, max_len, hd) with room for slots pos..pos+T-1");
    TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(1) == hd, "bad rope tables");
    const bool masked = mask.numel() > 0;
    const int64_t* tok = tokens.data_ptr<int64_t>();
    std::vector<int64_t> posv(B, pos);
    if (positions.numel() > 0) {
      TORCH_CHECK(positions.numel() == B && positions.is_contiguous(), "positions: one per row");
      std::copy(positions.data_ptr<int64_t>(), positions.data_ptr<int64_t>() + B, posv.begin());
    }
    const int64_t* posn = posv.data();
    TORCH_CHECK(!masked || (mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == B &&
                            mask.size(1) >= S && mask.stride(1) == 1), "mask: (B, >= pos + T) bool rows");
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(posn[b] >= 0 && posn[b] + T <= cos.size(0), "position outside the rope table");
      for (int64_t t = 0; t < T; ++t)
        TORCH_CHECK(tok[b * T + t] >= 0 && tok[b * T + t] < emb_.size(0), "token id outside the embedding");
    }
    const bool* mk = masked ? mask.data_ptr<bool>() : nullptr;
    const int64_t mstride = masked ? mask.stride(0) : 0;
    ensure_packed();

    auto opts = emb_.options();
    at::Tensor x = at::empty({M, D}, opts), xn = at::empty({M, D}, opts);
    at::Tensor qkv = at::empty({M, NH * hd}, opts), y = at::empty({M, H * hd}, opts);
    at::Tensor gu = at::empty({M, 2 * F}, opts), hbuf = at::empty({M, F}, opts);
    float* xp = x.data_ptr<float>();
    const float* ep = emb_.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) std::copy(ep + tok[m] * D, ep + (tok[m] + 1) * D, xp + m * D);
    // out (=|+=) in @ W_i of layer l
    auto matmul = [&](at::Tensor& out, const at::Tensor& in, int64_t l, int i, bool acc) {
      const int slot = i == 1 ? 0 : i == 2 ? 1 : i == 4 ? 2 : 3;
      packed_mm(in, packed_[4 * l + slot], out.size(1), out, acc);
    };

    float* kc = K.data_ptr<float>();
    float* vc = V.data_ptr<float>();
    const float* ct = cos.data_ptr<float>();
    const float* st = sin.data_ptr<float>();
    const float qscale = 1.0f / std::sqrt((float)hd);
    // attention work per (row, head); go parallel only when a chunk is worth a thread hand-off
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, S * hd));
    std::vector<float> tmp(hd);                          // one rotated q head (RoPE reads the unrotated halves)

    for (int64_t l = 0; l < L_; ++l) {
      const at::Tensor* w = &layers_[6 * l];
      rms_norm(xp, w[0].data_ptr<float>(), xn.data_ptr<float>(), M, D, eps_);
      matmul(qkv, xn, l, 1, false);
      // RoPE (q scaled by 1/sqrt(hd)) in place for q; k rotated and v copied straight into cache slot pos+t
      float* qp = qkv.data_ptr<float>();
      for (int64_t m = 0; m < M; ++m) {
        const int64_t b = m / T, t = m % T;
        const float* c = ct + (posn[b] + t) * hd;
        const float* s = st + (posn[b] + t) * hd;
        float* row = qp + m * NH * hd;
        for (int64_t h = 0; h < H; ++h) {
          rope_head(row + h * hd, c, s, qscale, tmp.data(), hd);
          std::copy(tmp.begin(), tmp.end(), row + h * hd);
        }
        for (int64_t h = 0; h < Hkv; ++h) {
          const int64_t slot = (((l * B + b) * Hkv + h) * Smax + pos + t) * hd;
          rope_head(row + (H + h) * hd, c, s, 1.0f, kc + slot, hd);
          std::copy(row + (H + Hkv + h) * hd, row + (H + Hkv + h + 1) * hd, vc + slot);
        }
      }
      // attention of each new token over slots [0, pos+t] of its row (padding slots masked out)
      float* yp = y.data_ptr<float>();
      at::parallel_for(0, M * H, grain, [&](int64_t lo, int64_t hi) {
        std::vector<float> p(S);
        for (int64_t mh = lo; mh < hi; ++mh) {
          const int64_t m = mh / H, h = mh % H, b = m / T, t = m % T, kh = h / g, St = pos + t + 1;
          const float* q = qp + m * NH * hd + h * hd;
          const float* kb = kc + ((l * B + b) * Hkv + kh) * Smax * hd;
          const float* vb = vc + ((l * B + b) * Hkv + kh) * Smax * hd;
          float mx = -std::numeric_limits<float>::infinity();
          for (int64_t u = 0; u < St; ++u) {
            if (mk && !mk[b * mstride + u]) {
              p[u] = -std::numeric_limits<float>::infinity();
              continue;
            }
            const float* ku = kb + u * hd;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t i = 0; i < hd; ++i) acc += q[i] * ku[i];
            p[u] = acc;
            mx = std::max(mx, acc);
          }
          float denom = 0.0f;
          for (int64_t u = 0; u < St; ++u) {
            p[u] = std::exp(p[u] - mx);
            denom += p[u];
          }
          float* out = yp + m * H * hd + h * hd;
          std::fill(out, out + hd, 0.0f);
          for (int64_t u = 0; u < St; ++u) {
            if (p[u] == 0.0f) continue;
            const float pu = p[u] / denom;
            const float* vu = vb + u * hd;
#pragma omp simd
            for (int64_t i = 0; i < hd; ++i) out[i] += pu * vu[i];
          }
        }
      });
      matmul(x, y, l, 2, true);                          // residual add rides on the output projection
      rms_norm(xp, w[3].data_ptr<float>(), xn.data_ptr<float>(), M, D, eps_);
      matmul(gu, xn, l, 4, false);
      const float* gp = gu.data_ptr<float>();
      float* hp = hbuf.data_ptr<float>();
      at::parallel_for(0, M, std::max<int64_t>(1, 65536 / F), [&](int64_t lo, int64_t hi) {
        for (int64_t m = lo; m < hi; ++m) {
          const float* gate = gp + m * 2 * F;
          const float* up = gate + F;
          float* o = hp + m * F;
          for (int64_t i = 0; i < F; ++i) o[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
        }
      });
      matmul(x, hbuf, l, 5, true);
    }
    rms_norm(xp, norm_w_.data_ptr<float>(), xn.data_ptr<float>(), M, D, eps_);
    at::Tensor logits = at::empty({M, head_.size(1)}, opts);
    packed_mm(xn, packed_head_, head_.size(1), logits, false);
    return logits;
  }

 private:
  at::Tensor emb_;
  std::vector<at::Tensor> layers_;
  at::Tensor norm_w_, head_;
  std::vector<at::Tensor> packed_;                     // per layer: W_qkv, W_o, W_gate_up, W_down, packed
  at::Tensor packed_head_;
  int64_t H_, Hkv_, hd_, L_, D_, F_;
  float eps_;
};

// Greedy pick per row over the first n columns of fp32 logits (B, V): torch.argmax's answer (first maximum; a NaN
// counts as the maximum) without its reduction machinery, which costs ~30 us for 8k columns at batch 1.
at::Tensor argmax_rows(at::Tensor logits, int64_t n) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1, "logits: (B, V) fp32");
  TORCH_CHECK(n > 0 && n <= logits.size(1), "n out of range");
  const int64_t B = logits.size(0), rs = logits.stride(0);
  at::Tensor out = at::empty({B}, logits.options().dtype(at::kLong));
  const float* lp = logits.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const float* r = lp + b * rs;
    int64_t best = 0;
    float bv = r[0];
    if (!std::isnan(bv)) {
      for (int64_t i = 1; i < n; ++i) {
        if (r[i] > bv || std::isnan(r[i])) {
          best = i;
          bv = r[i];
          if (std::isnan(bv)) break;
        }
      }
    }
    op[b] = best;
  }
  return out;
}

// How many threads one at::parallel_for of this module fans out to (at::get_num_threads() when it was compiled
// with OpenMP; 1 when it was not: the inline template then runs serially, silently).
int64_t parallel_width() {
  std::vector<int> seen(std::max(at::get_num_threads(), 1) + 1, 0);
  at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) {
    seen[std::min<int64_t>(at::get_thread_num(), seen.size() - 1)] = 1;
  });
  int64_t n = 0;
  for (int v : seen) n += v;
  return n;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("parallel_width", &parallel_width);
  m.def("argmax_rows", &argmax_rows);
  m.def("pack_panels", &pack_panels);
  m.def("packed_mm", &packed_mm_py, pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("n"),
        pybind11::arg("out") = pybind11::none());
  pybind11::class_<NativeDecoder>(m, "NativeDecoder")
      .def(pybind11::init<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor, int64_t, int64_t, int64_t,
                          double>())
      .def("set_packed", &NativeDecoder::set_packed)
      .def("step", &NativeDecoder::step, pybind11::call_guard<pybind11::gil_scoped_release>());
}
