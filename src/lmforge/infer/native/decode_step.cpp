// lmforge native decode step: one new token per row through a Llama-style model (RoPE, RMSNorm, SwiGLU,
// grouped-query attention, no biases), fp32 on CPU. Built on first use by lmforge/infer/native.py.
//
// Why C++: at batch 1 a small model's decode step is about 25 tensor calls per layer from Python, and each costs
// microseconds of dispatch, which is more than the arithmetic. Here the matmuls stay ATen/MKL calls (they are
// memory-bound and MKL streams the weights well) and everything between them -- RMSNorm, RoPE, the cache write,
// single-query attention, SiLU*up -- is a plain loop over a few hundred floats. The math is the same as
// Transformer.forward (and lmforge.infer.fastpath): tests compare the logits to 1e-5.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
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

}  // namespace

class NativeDecoder {
 public:
  // layers: 6 tensors per layer: attn_norm (D), W_qkv (D, (H+2Hkv)hd), W_o (H hd, D), ffn_norm (D),
  // W_gate_up (D, 2F), W_down (F, D); every W is the (in, out) operand of x @ W (any strides at::mm takes).
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

  // tokens (B) int64; positions (B) int64 (the RoPE position of each row's new token) or empty for `pos`;
  // mask: (B, >= S) bool with row stride, True = real token, or an empty tensor for no padding; K, V: (L, B, Hkv, max_len, hd) contiguous
  // fp32 caches whose slot `pos` is written; cos/sin: (P, hd) tables, sin with rotate_half's sign folded in.
  // Returns logits (B, V). The caller advances the cache position.
  at::Tensor step(at::Tensor tokens, at::Tensor positions, at::Tensor mask, at::Tensor K, at::Tensor V, int64_t pos,
                  at::Tensor cos, at::Tensor sin) {
    const int64_t B = tokens.size(0), D = D_, H = H_, Hkv = Hkv_, hd = hd_, F = F_, S = pos + 1;
    const int64_t NH = H + 2 * Hkv, g = H / Hkv, Smax = K.size(3);
    TORCH_CHECK(K.is_contiguous() && V.is_contiguous() && K.scalar_type() == at::kFloat && K.sizes() == V.sizes() &&
                K.dim() == 5 && K.size(0) == L_ && K.size(1) == B && K.size(2) == Hkv && K.size(4) == hd &&
                S <= Smax, "KV cache: contiguous fp32 (L, B, Hkv, max_len, hd) with room for slot pos");
    TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(1) == hd, "bad rope tables");
    const bool masked = mask.numel() > 0;
    const int64_t* tok = tokens.data_ptr<int64_t>();
    std::vector<int64_t> posv(B, pos);
    if (positions.numel() > 0) {
      TORCH_CHECK(positions.numel() == B && positions.is_contiguous(), "positions: one per row");
      std::copy(positions.data_ptr<int64_t>(), positions.data_ptr<int64_t>() + B, posv.begin());
    }
    const int64_t* posn = posv.data();
    TORCH_CHECK(tokens.is_contiguous() && tokens.scalar_type() == at::kLong, "tokens: contiguous int64");
    TORCH_CHECK(!masked || (mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == B &&
                            mask.size(1) >= S && mask.stride(1) == 1), "mask: (B, >= pos + 1) bool rows");
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(posn[b] >= 0 && posn[b] < cos.size(0), "position outside the rope table");
      TORCH_CHECK(tok[b] >= 0 && tok[b] < emb_.size(0), "token id outside the embedding");
    }
    const bool* mk = masked ? mask.data_ptr<bool>() : nullptr;
    const int64_t mstride = masked ? mask.stride(0) : 0;

    auto opts = emb_.options();
    at::Tensor x = at::empty({B, D}, opts), xn = at::empty({B, D}, opts);
    at::Tensor qkv = at::empty({B, NH * hd}, opts), y = at::empty({B, H * hd}, opts);
    at::Tensor gu = at::empty({B, 2 * F}, opts), hbuf = at::empty({B, F}, opts);
    float* xp = x.data_ptr<float>();
    const float* ep = emb_.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) std::copy(ep + tok[b] * D, ep + (tok[b] + 1) * D, xp + b * D);

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
      rms_norm(xp, w[0].data_ptr<float>(), xn.data_ptr<float>(), B, D, eps_);
      at::mm_out(qkv, xn, w[1]);
      // RoPE (q scaled by 1/sqrt(hd)) in place for q; k rotated and v copied straight into cache slot `pos`
      float* qp = qkv.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) {
        const float* c = ct + posn[b] * hd;
        const float* s = st + posn[b] * hd;
        float* row = qp + b * NH * hd;
        for (int64_t h = 0; h < H; ++h) {
          rope_head(row + h * hd, c, s, qscale, tmp.data(), hd);
          std::copy(tmp.begin(), tmp.end(), row + h * hd);
        }
        for (int64_t h = 0; h < Hkv; ++h) {
          const int64_t slot = (((l * B + b) * Hkv + h) * Smax + pos) * hd;
          rope_head(row + (H + h) * hd, c, s, 1.0f, kc + slot, hd);
          std::copy(row + (H + Hkv + h) * hd, row + (H + Hkv + h + 1) * hd, vc + slot);
        }
      }
      // single-query attention over slots [0, S) of each row (padding slots masked out)
      float* yp = y.data_ptr<float>();
      at::parallel_for(0, B * H, grain, [&](int64_t lo, int64_t hi) {
        std::vector<float> p(S);
        for (int64_t bh = lo; bh < hi; ++bh) {
          const int64_t b = bh / H, h = bh % H, kh = h / g;
          const float* q = qp + b * NH * hd + h * hd;
          const float* kb = kc + ((l * B + b) * Hkv + kh) * Smax * hd;
          const float* vb = vc + ((l * B + b) * Hkv + kh) * Smax * hd;
          float mx = -std::numeric_limits<float>::infinity();
          for (int64_t t = 0; t < S; ++t) {
            if (mk && !mk[b * mstride + t]) {
              p[t] = -std::numeric_limits<float>::infinity();
              continue;
            }
            const float* kt = kb + t * hd;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t i = 0; i < hd; ++i) acc += q[i] * kt[i];
            p[t] = acc;
            mx = std::max(mx, acc);
          }
          float denom = 0.0f;
          for (int64_t t = 0; t < S; ++t) {
            p[t] = std::exp(p[t] - mx);
            denom += p[t];
          }
          float* out = yp + b * H * hd + h * hd;
          std::fill(out, out + hd, 0.0f);
          for (int64_t t = 0; t < S; ++t) {
            if (p[t] == 0.0f) continue;
            const float pt = p[t] / denom;
            const float* vt = vb + t * hd;
#pragma omp simd
            for (int64_t i = 0; i < hd; ++i) out[i] += pt * vt[i];
          }
        }
      });
      at::addmm_out(x, x, y, w[2]);                      // residual add rides on the output projection
      rms_norm(xp, w[3].data_ptr<float>(), xn.data_ptr<float>(), B, D, eps_);
      at::mm_out(gu, xn, w[4]);
      const float* gp = gu.data_ptr<float>();
      float* hp = hbuf.data_ptr<float>();
      at::parallel_for(0, B, std::max<int64_t>(1, 65536 / F), [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; ++b) {
          const float* gate = gp + b * 2 * F;
          const float* up = gate + F;
          float* o = hp + b * F;
          for (int64_t i = 0; i < F; ++i) o[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
        }
      });
      at::addmm_out(x, x, hbuf, w[5]);
    }
    rms_norm(xp, norm_w_.data_ptr<float>(), xn.data_ptr<float>(), B, D, eps_);
    return at::mm(xn, head_);
  }

 private:
  at::Tensor emb_;
  std::vector<at::Tensor> layers_;
  at::Tensor norm_w_, head_;
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("argmax_rows", &argmax_rows);
  pybind11::class_<NativeDecoder>(m, "NativeDecoder")
      .def(pybind11::init<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor, int64_t, int64_t, int64_t,
                          double>())
      .def("step", &NativeDecoder::step, pybind11::call_guard<pybind11::gil_scoped_release>());
}
