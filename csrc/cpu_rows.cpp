// mr1fast.kernels._cpu: the softmax rows of the torch implementation's chunks on the CPU.
//
// exp_rows(z, e, want_dot) for logits z [R, V] (fp32, contiguous): per row, one pass for the max m
// and one pass that writes e = exp(z - m) and sums s = sum_v e and, with want_dot,
// t = sum_v e * (z - m) (the entropy is log s - t / s). e may be z itself (in place). The row
// (V * 4 bytes) stays in the core's cache between the two passes, so the [R, V] chunk is read
// from memory once and written once, where torch's amax, sub_, exp_ and sum traverse it six
// times. Rows run in parallel (at::parallel_for, torch's OpenMP pool). The reference is the
// torch fallback beside the caller (mr1fast/kernels/cpu_rows.py).
//
// Vectorized<float> is ATen's SIMD type for the capability this file is compiled for (setup.py
// passes the build machine's: AVX512 or AVX2, or none); capability() reports it, so that a
// build copied to a machine without those instructions is never called.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <string>

namespace {

using Vec = at::vec::Vectorized<float>;

std::string capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "DEFAULT";
#endif
}

std::vector<torch::Tensor> exp_rows(torch::Tensor z, torch::Tensor e, bool want_dot) {
  TORCH_CHECK(z.dim() == 2 && z.scalar_type() == torch::kFloat && z.is_contiguous() && z.is_cpu(),
              "exp_rows: z must be a contiguous 2-D fp32 CPU tensor, got ", z.sizes(), " ",
              z.scalar_type());
  TORCH_CHECK(e.sizes() == z.sizes() && e.scalar_type() == torch::kFloat && e.is_contiguous(),
              "exp_rows: e must be a contiguous fp32 tensor shaped like z, got ", e.sizes());
  const int64_t R = z.size(0), V = z.size(1);
  TORCH_CHECK(V > 0, "exp_rows: z has no columns");
  auto m = torch::empty({R}, z.options());
  auto s = torch::empty({R}, z.options());
  auto t = want_dot ? torch::empty({R}, z.options()) : torch::empty({0}, z.options());
  const float* zp = z.data_ptr<float>();
  float* ep = e.data_ptr<float>();
  float* mp = m.data_ptr<float>();
  float* sp = s.data_ptr<float>();
  float* tp = want_dot ? t.data_ptr<float>() : nullptr;
  constexpr int64_t W = Vec::size();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* zr = zp + r * V;
      float* er = ep + r * V;
      const float mx = at::vec::reduce_all<float>(
          [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, zr, V);
      const Vec mv(mx);
      Vec acc_s(0.f), acc_t(0.f);
      int64_t v = 0;
      for (; v + W <= V; v += W) {
        const Vec x = Vec::loadu(zr + v) - mv;
        const Vec ex = x.exp_u20();
        ex.store(er + v);
        acc_s = acc_s + ex;
        if (want_dot) acc_t = at::vec::fmadd(ex, x, acc_t);
      }
      float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc_s);
      float dot = want_dot
          ? at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc_t) : 0.f;
      for (; v < V; ++v) {
        const float x = zr[v] - mx;
        const float ex = std::exp(x);
        er[v] = ex;
        sum += ex;
        dot += ex * x;
      }
      mp[r] = mx;
      sp[r] = sum;
      if (want_dot) tp[r] = dot;
    }
  });
  return {m, s, t};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("capability", &capability, "the SIMD capability this build was compiled for");
  mod.def("exp_rows", &exp_rows, "per row of z: e = exp(z - max), (max, sum e, sum e (z - max))",
          pybind11::arg("z"), pybind11::arg("e"), pybind11::arg("want_dot"));
}
