// Fused masked attention over many tiny heads (CST's support-axis attention): forward and backward.
//
// torch's CPU scaled_dot_product_attention is built for long sequences; CST's block 1 runs ~12k problems of
// 10 queries x 37 keys x 4 dims per training batch, where its per-problem overhead dominates. Here one
// (sample, head) problem at a time runs in local buffers whose key axis is padded to whole vectors, so the
// loops vectorize (expf too, through glibc's vector math with -ffast-math): along the keys for a tiny head
// dim (block 1: d = 4), along the head dim when it is whole vectors (block 2: d = 16). Problems are
// independent: the result does not depend on the thread count.
//
// Layouts (contiguous float32): q (N, nq, H, d); kv (N, nk, 2, H, d) (keys then values: one linear layer's
// output); key_valid (N, nk) uint8 with key 0 always valid (CST's CLS key). Logits are plain dot products.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr float kMasked = -1e30f;  // additive logit of a masked key
constexpr float kFloor = -80.f;    // exp(-80) ~ 2e-35 > FLT_MIN: keeps expf off its slow underflow path
constexpr int64_t kLanes = 8;      // floats per vector as GCC emits them with -march=native (256-bit)

int64_t padded(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// kt / vt: the problem's keys and values transposed to (d, nk_pad), zero padded.
void gather(const float* kv, int64_t n, int64_t h, int64_t nk, int64_t H, int64_t d, int64_t nk_pad,
            float* kt, float* vt) {
  for (int64_t j = 0; j < nk; ++j) {
    const float* k = kv + ((n * nk + j) * 2 * H + h) * d;
    const float* v = k + H * d;
    for (int64_t e = 0; e < d; ++e) {
      kt[e * nk_pad + j] = k[e];
      vt[e * nk_pad + j] = v[e];
    }
  }
}

// row (nk_pad logits, masked keys at kMasked) -> softmax probabilities, exactly 0 where keep is 0
void softmax(float* row, const float* keep, int64_t nk_pad) {
  float m = row[0];
  for (int64_t j = 1; j < nk_pad; ++j) m = std::max(m, row[j]);
  for (int64_t j = 0; j < nk_pad; ++j) row[j] = std::exp(std::max(row[j] - m, kFloor)) * keep[j];
  float s = 0.f;
  for (int64_t j = 0; j < nk_pad; ++j) s += row[j];
  const float inv = 1.f / s;
  for (int64_t j = 0; j < nk_pad; ++j) row[j] *= inv;
}

float dot(const float* a, const float* b, int64_t d) {
  float acc = 0.f;
  for (int64_t e = 0; e < d; ++e) acc += a[e] * b[e];
  return acc;
}

}  // namespace

// a CPU kernel: it reads data_ptr directly, so a tensor elsewhere (CUDA, meta) must never reach it
void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU, got a tensor on ", t.device());
}

void check(const torch::Tensor& q, const torch::Tensor& kv) {
  check_cpu(q, "q");
  check_cpu(kv, "kv");
  TORCH_CHECK(q.dim() == 4 && kv.dim() == 5, "q must be (N, nq, H, d) and kv (N, nk, 2, H, d)");
  TORCH_CHECK(q.scalar_type() == torch::kFloat && kv.scalar_type() == torch::kFloat, "float32 only");
  TORCH_CHECK(q.is_contiguous() && kv.is_contiguous(), "q and kv must be contiguous");
  TORCH_CHECK(kv.size(0) == q.size(0) && kv.size(2) == 2 && kv.size(3) == q.size(2) && kv.size(4) == q.size(3),
              "kv does not match q");
}

// -> (out (N, nq, H, d), probs (N, H, nq, nk), or an empty tensor when need_probs is false: no backward)
std::vector<torch::Tensor> forward(torch::Tensor q, torch::Tensor kv, torch::Tensor key_valid, bool need_probs) {
  check(q, kv);
  check_cpu(key_valid, "key_valid");
  TORCH_CHECK(key_valid.scalar_type() == torch::kUInt8 && key_valid.is_contiguous() &&
                  key_valid.dim() == 2 && key_valid.size(0) == q.size(0) && key_valid.size(1) == kv.size(1),
              "key_valid must be contiguous uint8 (N, nk)");
  const int64_t N = q.size(0), nq = q.size(1), H = q.size(2), d = q.size(3), nk = kv.size(1);
  auto out = torch::empty_like(q);
  auto probs = need_probs ? torch::empty({N, H, nq, nk}, q.options()) : torch::empty({0}, q.options());
  const float* Q = q.data_ptr<float>();
  const float* KV = kv.data_ptr<float>();
  const uint8_t* A = key_valid.data_ptr<uint8_t>();
  float* O = out.data_ptr<float>();
  float* P = need_probs ? probs.data_ptr<float>() : nullptr;
  const int64_t nk_pad = padded(nk);
  const bool wide = d % kLanes == 0;
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    std::vector<float> kt(d * nk_pad, 0.f), vt(d * nk_pad, 0.f), bias(nk_pad), keep(nk_pad), row(nk_pad);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t j = 0; j < nk_pad; ++j) {
        const bool valid = j < nk && A[n * nk + j];
        bias[j] = valid ? 0.f : kMasked;
        keep[j] = valid ? 1.f : 0.f;
      }
      for (int64_t h = 0; h < H; ++h) {
        const float* k0 = KV + (n * nk * 2 * H + h) * d;  // key j at k0 + j * 2Hd, its value H*d further
        if (!wide) gather(KV, n, h, nk, H, d, nk_pad, kt.data(), vt.data());
        for (int64_t i = 0; i < nq; ++i) {
          const float* qi = Q + ((n * nq + i) * H + h) * d;
          float* oi = O + ((n * nq + i) * H + h) * d;
          std::copy(bias.begin(), bias.end(), row.begin());
          if (wide) {  // head dim of whole vectors: vectorize along it
            for (int64_t j = 0; j < nk; ++j) row[j] += dot(qi, k0 + j * 2 * H * d, d);
          } else {  // tiny head dim: vectorize along the keys
            for (int64_t e = 0; e < d; ++e) {
              const float qe = qi[e];
              const float* ke = kt.data() + e * nk_pad;
              for (int64_t j = 0; j < nk_pad; ++j) row[j] += qe * ke[j];
            }
          }
          softmax(row.data(), keep.data(), nk_pad);
          if (wide) {
            std::fill(oi, oi + d, 0.f);
            for (int64_t j = 0; j < nk; ++j) {
              const float pj = row[j];
              const float* vj = k0 + j * 2 * H * d + H * d;
              for (int64_t e = 0; e < d; ++e) oi[e] += pj * vj[e];
            }
          } else {
            for (int64_t e = 0; e < d; ++e) oi[e] = dot(row.data(), vt.data() + e * nk_pad, nk_pad);
          }
          if (P) std::copy(row.begin(), row.begin() + nk, P + ((n * H + h) * nq + i) * nk);
        }
      }
    }
  });
  return {out, probs};
}

// grad_out (N, nq, H, d) -> (grad_q (N, nq, H, d), grad_kv (N, nk, 2, H, d))
std::vector<torch::Tensor> backward(torch::Tensor grad_out, torch::Tensor q, torch::Tensor kv,
                                    torch::Tensor probs) {
  check(q, kv);
  check_cpu(grad_out, "grad_out");
  check_cpu(probs, "probs");
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.sizes() == q.sizes(), "grad_out must be contiguous, q's shape");
  TORCH_CHECK(probs.is_contiguous() && probs.numel() == q.size(0) * q.size(2) * q.size(1) * kv.size(1),
              "probs must come from forward(..., need_probs=true)");
  const int64_t N = q.size(0), nq = q.size(1), H = q.size(2), d = q.size(3), nk = kv.size(1);
  auto grad_q = torch::empty_like(q);
  auto grad_kv = torch::empty_like(kv);
  const float* G = grad_out.data_ptr<float>();
  const float* Q = q.data_ptr<float>();
  const float* KV = kv.data_ptr<float>();
  const float* P = probs.data_ptr<float>();
  float* GQ = grad_q.data_ptr<float>();
  float* GKV = grad_kv.data_ptr<float>();
  const int64_t nk_pad = padded(nk);
  const bool wide = d % kLanes == 0;
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    std::vector<float> kt(d * nk_pad, 0.f), vt(d * nk_pad, 0.f), gkt(d * nk_pad), gvt(d * nk_pad);
    std::vector<float> p(nk_pad, 0.f), ds(nk_pad);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t h = 0; h < H; ++h) {
        const int64_t stride = 2 * H * d;  // from key j to key j + 1 (values sit H*d after their key)
        const float* k0 = KV + (n * nk * 2 * H + h) * d;
        float* gk0 = GKV + (n * nk * 2 * H + h) * d;
        if (wide) {
          for (int64_t j = 0; j < nk; ++j) {
            std::fill(gk0 + j * stride, gk0 + j * stride + d, 0.f);
            std::fill(gk0 + j * stride + H * d, gk0 + j * stride + H * d + d, 0.f);
          }
        } else {
          gather(KV, n, h, nk, H, d, nk_pad, kt.data(), vt.data());
          std::fill(gkt.begin(), gkt.end(), 0.f);
          std::fill(gvt.begin(), gvt.end(), 0.f);
        }
        for (int64_t i = 0; i < nq; ++i) {
          const float* gi = G + ((n * nq + i) * H + h) * d;
          const float* qi = Q + ((n * nq + i) * H + h) * d;
          float* gqi = GQ + ((n * nq + i) * H + h) * d;
          std::copy(P + ((n * H + h) * nq + i) * nk, P + ((n * H + h) * nq + i + 1) * nk, p.begin());
          std::fill(ds.begin(), ds.end(), 0.f);
          if (wide) {  // dP = dO V^T; dV += P^T dO
            for (int64_t j = 0; j < nk; ++j) {
              const float* vj = k0 + j * stride + H * d;
              float* gvj = gk0 + j * stride + H * d;
              ds[j] = dot(gi, vj, d);
              for (int64_t e = 0; e < d; ++e) gvj[e] += p[j] * gi[e];
            }
          } else {
            for (int64_t e = 0; e < d; ++e) {
              const float ge = gi[e];
              const float* ve = vt.data() + e * nk_pad;
              float* gve = gvt.data() + e * nk_pad;
              for (int64_t j = 0; j < nk_pad; ++j) {
                ds[j] += ge * ve[j];
                gve[j] += p[j] * ge;
              }
            }
          }
          const float pd = dot(p.data(), ds.data(), nk_pad);
          for (int64_t j = 0; j < nk_pad; ++j) ds[j] = p[j] * (ds[j] - pd);  // softmax backward
          if (wide) {  // dQ = dS K; dK += dS^T Q
            std::fill(gqi, gqi + d, 0.f);
            for (int64_t j = 0; j < nk; ++j) {
              const float* kj = k0 + j * stride;
              float* gkj = gk0 + j * stride;
              for (int64_t e = 0; e < d; ++e) {
                gqi[e] += ds[j] * kj[e];
                gkj[e] += ds[j] * qi[e];
              }
            }
          } else {
            for (int64_t e = 0; e < d; ++e) {
              const float* ke = kt.data() + e * nk_pad;
              float* gke = gkt.data() + e * nk_pad;
              const float qe = qi[e];
              float acc = 0.f;
              for (int64_t j = 0; j < nk_pad; ++j) {
                acc += ds[j] * ke[j];
                gke[j] += ds[j] * qe;
              }
              gqi[e] = acc;
            }
          }
        }
        if (!wide) {
          for (int64_t j = 0; j < nk; ++j) {
            for (int64_t e = 0; e < d; ++e) {
              gk0[j * stride + e] = gkt[e * nk_pad + j];
              gk0[j * stride + H * d + e] = gvt[e * nk_pad + j];
            }
          }
        }
      }
    }
  });
  return {grad_q, grad_kv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "masked tiny-head attention: (out, probs)");
  m.def("backward", &backward, "gradients (q, kv) of the masked tiny-head attention");
}
