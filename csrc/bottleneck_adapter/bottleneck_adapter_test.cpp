// Unit test of the torch-free bottleneck_adapter CPU kernels (no torch, no Python).
// Build: g++ -std=c++17 -O1 -fopenmp bottleneck_adapter_test.cpp bottleneck_adapter_cpu.cpp -o t && ./t
// (run from Python by tests/ops/test_bottleneck_adapter.py::test_cpp_kernel_unit_test).
// Returns non-zero on the first failure, printing what failed.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../common/philox.h"
#include "bottleneck_adapter_cpu.h"

using namespace fastpeft;

static int failures = 0;
#define EXPECT(cond, ...)                              \
  do {                                                 \
    if (!(cond)) {                                     \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                        \
      std::printf("\n");                               \
      ++failures;                                      \
    }                                                  \
  } while (0)

static const AdapterAct kActs[] = {AdapterAct::kRelu, AdapterAct::kGelu, AdapterAct::kGeluTanh, AdapterAct::kSilu};

// Known values of the activations.
static void test_activation_values() {
  EXPECT(adapter_act_value(AdapterAct::kRelu, -2.0) == 0.0 && adapter_act_value(AdapterAct::kRelu, 3.0) == 3.0,
         "relu");
  EXPECT(std::fabs(adapter_act_value(AdapterAct::kGelu, 1.0) - 0.8413447460685429) < 1e-12, "gelu(1)");
  EXPECT(std::fabs(adapter_act_value(AdapterAct::kGelu, -1.0) + 0.15865525393145707) < 1e-12, "gelu(-1)");
  EXPECT(std::fabs(adapter_act_value(AdapterAct::kGeluTanh, 1.0) - 0.8411919906082768) < 1e-12, "gelu_tanh(1)");
  EXPECT(std::fabs(adapter_act_value(AdapterAct::kSilu, 1.0) - 0.7310585786300049) < 1e-12, "silu(1)");
  EXPECT(adapter_act_grad(AdapterAct::kRelu, 0.0) == 0.0, "relu'(0) must be 0 like PyTorch");
}

// Derivatives against central differences.
static void test_activation_grads() {
  for (AdapterAct act : kActs) {
    for (double h = -4.0; h <= 4.0; h += 0.37) {
      const double e = 1e-6;
      const double fd = (adapter_act_value(act, h + e) - adapter_act_value(act, h - e)) / (2 * e);
      EXPECT(std::fabs(fd - adapter_act_grad(act, h)) < 1e-6, "act %d grad at %g: %g vs fd %g", static_cast<int>(act),
             h, adapter_act_grad(act, h), fd);
    }
  }
}

// Forward: bias added in place, d = act(h) * keep / (1-p) with the Philox stream-1 mask;
// backward regenerates the same mask and multiplies by act'(h); gh is added.
static void test_forward_backward_kernels() {
  const int64_t M = 37, Bn = 13;
  const double p = 0.3;
  const uint64_t seed = 0x123456789abcULL;
  std::vector<double> h(M * Bn), h0, b(Bn), d(M * Bn), dd(M * Bn), dd0, gh(M * Bn), d2(M * Bn);
  std::srand(7);
  auto rnd = [] { return (std::rand() / static_cast<double>(RAND_MAX)) * 4.0 - 2.0; };
  for (auto& v : h) v = rnd();
  for (auto& v : b) v = rnd();
  for (auto& v : dd) v = rnd();
  for (auto& v : gh) v = rnd();
  h0 = h;
  dd0 = dd;
  const uint32_t thr = dropout_threshold(p);
  std::vector<uint8_t> keep(Bn);
  for (AdapterAct act : kActs) {
    h = h0;
    adapter_bias_act_dropout_fwd<double>(h.data(), b.data(), d.data(), M, Bn, act, p, seed);
    int64_t kept = 0;
    for (int64_t i = 0; i < M; ++i) {
      dropout_keep_row(seed, kAdapterDropoutStream, i, Bn, thr, keep.data());
      for (int64_t j = 0; j < Bn; ++j) {
        const double hv = h0[i * Bn + j] + b[j];
        EXPECT(std::fabs(h[i * Bn + j] - hv) < 1e-14, "h + b at (%lld, %lld)", (long long)i, (long long)j);
        const double want = keep[j] ? adapter_act_value(act, hv) / (1 - p) : 0.0;
        EXPECT(std::fabs(d[i * Bn + j] - want) < 1e-12, "d at (%lld, %lld)", (long long)i, (long long)j);
        kept += keep[j];
      }
    }
    EXPECT(kept > 0 && kept < M * Bn, "mask should keep some and drop some, kept %lld", (long long)kept);

    dd = dd0;
    adapter_act_dropout_bwd<double>(h.data(), dd.data(), gh.data(), d2.data(), M, Bn, act, p, seed);
    for (int64_t i = 0; i < M; ++i) {
      dropout_keep_row(seed, kAdapterDropoutStream, i, Bn, thr, keep.data());
      for (int64_t j = 0; j < Bn; ++j) {
        const int64_t k = i * Bn + j;
        const double want = (keep[j] ? dd0[k] / (1 - p) * adapter_act_grad(act, h[k]) : 0.0) + gh[k];
        EXPECT(std::fabs(dd[k] - want) < 1e-12, "dh at (%lld, %lld)", (long long)i, (long long)j);
        EXPECT(d2[k] == d[k], "backward's recomputed d must equal forward's at (%lld, %lld)", (long long)i,
               (long long)j);
      }
    }
  }
}

// No dropout (p = 0) keeps everything; no bias leaves h untouched.
static void test_no_dropout_no_bias() {
  const int64_t M = 5, Bn = 6;
  std::vector<float> h(M * Bn), d(M * Bn);
  for (int64_t k = 0; k < M * Bn; ++k) h[k] = static_cast<float>(k) - 12.5f;
  const std::vector<float> h0 = h;
  adapter_bias_act_dropout_fwd<float>(h.data(), nullptr, d.data(), M, Bn, AdapterAct::kRelu, 0.0, 1);
  for (int64_t k = 0; k < M * Bn; ++k) {
    EXPECT(h[k] == h0[k], "h changed without a bias");
    EXPECT(d[k] == (h0[k] > 0 ? h0[k] : 0.0f), "relu without dropout");
  }
}

// y = x + b_up, x with a row stride; every combination of residual / bias; bf16.
static void test_residual_bias_init() {
  const int64_t M = 4, H = 7, ldx = 10;
  std::vector<float> x(M * ldx), b(H), y(M * H);
  for (int64_t k = 0; k < M * ldx; ++k) x[k] = 0.25f * static_cast<float>(k);
  for (int64_t j = 0; j < H; ++j) b[j] = -1.0f - j;
  for (int residual = 0; residual < 2; ++residual)
    for (int with_b = 0; with_b < 2; ++with_b) {
      adapter_residual_bias_init<float>(x.data(), ldx, with_b ? b.data() : nullptr, y.data(), M, H, residual);
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < H; ++j)
          EXPECT(y[i * H + j] == (residual ? x[i * ldx + j] : 0.0f) + (with_b ? b[j] : 0.0f),
                 "init residual=%d bias=%d at (%lld, %lld)", residual, with_b, (long long)i, (long long)j);
    }
  std::vector<bf16_t> xb(M * H), bb(H), yb(M * H);
  for (int64_t k = 0; k < M * H; ++k) xb[k] = from_float<bf16_t>(0.5f * k);
  for (int64_t j = 0; j < H; ++j) bb[j] = from_float<bf16_t>(1.0f);
  adapter_residual_bias_init<bf16_t>(xb.data(), H, bb.data(), yb.data(), M, H, true);
  for (int64_t k = 0; k < M * H; ++k)
    EXPECT(to_float(yb[k]) == to_float(from_float<bf16_t>(0.5f * k + 1.0f)), "bf16 init at %lld", (long long)k);
}

int main() {
  test_activation_values();
  test_activation_grads();
  test_forward_backward_kernels();
  test_no_dropout_no_bias();
  test_residual_bias_init();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("bottleneck_adapter kernels: all tests passed\n");
  return 0;
}
