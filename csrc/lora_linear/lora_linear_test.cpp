// Unit test of the torch-free lora_linear CPU kernels (no torch needed):
//   g++ -std=c++17 -O2 -fopenmp csrc/lora_linear/lora_linear_test.cpp csrc/lora_linear/lora_linear_cpu.cpp -o /tmp/t && /tmp/t
// Checks lora_keep_row against the scalar reference dropout_keep_row (philox.h), and the
// dropout / masked-accumulate / masked-store kernels against naive loops, on odd sizes and strided input.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "../common/philox.h"
#include "lora_linear_cpu.h"

using namespace fastpeft;

static int failures = 0;
#define CHECK(cond, ...)                 \
  do {                                   \
    if (!(cond)) {                       \
      std::printf("FAIL: " __VA_ARGS__); \
      std::printf("\n");                 \
      ++failures;                        \
    }                                    \
  } while (0)

static void test_keep_row() {
  const uint64_t seeds[] = {0ull, 1ull, 123456789ull, 0xDEADBEEFCAFEF00Dull & 0x7fffffffffffffffull};
  const int64_t cols_list[] = {1, 3, 4, 5, 31, 32, 33, 63, 64, 65, 67, 127, 128, 129, 257, 1031};
  const double ps[] = {0.0, 0.1, 0.5, 0.9};
  for (uint64_t seed : seeds)
    for (int64_t cols : cols_list)
      for (double p : ps)
        for (int64_t row : {0, 1, 77, 100000}) {
          const uint32_t t = dropout_threshold(p);
          std::vector<uint8_t> a(cols), b(cols);
          dropout_keep_row(seed, 3u, row, cols, t, a.data());
          lora_keep_row(seed, 3u, row, cols, t, b.data());
          CHECK(a == b, "lora_keep_row != dropout_keep_row (seed %llu cols %lld p %g row %lld)",
                (unsigned long long)seed, (long long)cols, p, (long long)row);
          for (int isa = 0; isa <= 2; ++isa) {  // every vector path (the ones this CPU has)
            std::fill(b.begin(), b.end(), uint8_t(7));
            lora_keep_row_isa(isa, seed, 3u, row, cols, t, b.data());
            CHECK(a == b, "lora_keep_row_isa(%d) != dropout_keep_row (seed %llu cols %lld p %g row %lld)", isa,
                  (unsigned long long)seed, (long long)cols, p, (long long)row);
          }
        }
}

static void test_dropout_and_accumulate() {
  const int64_t M = 37, K = 45, row0 = 5, rows = 29;
  const double p = 0.3, inv = 1.0 / (1.0 - p);
  const uint32_t t = dropout_threshold(p);
  const uint64_t seed = 987654321ull;
  // x stored transposed: x[m, k] = xt[k * M + m]  (strides sx0 = 1, sx1 = M)
  std::vector<float> xt(M * K);
  for (int64_t i = 0; i < M * K; ++i) xt[i] = std::sin(0.37 * i) * 3.0f;
  std::vector<float> out(rows * K);
  std::vector<uint8_t> keep(rows * K);
  lora_dropout_rows<float, float>(xt.data(), 1, M, row0, rows, K, seed, 0u, t, inv, out.data(), keep.data());
  std::vector<uint8_t> ref(K);
  int kept = 0;
  for (int64_t i = 0; i < rows; ++i) {
    dropout_keep_row(seed, 0u, row0 + i, K, t, ref.data());
    for (int64_t k = 0; k < K; ++k) {
      const float want = ref[k] ? xt[k * M + row0 + i] * static_cast<float>(inv) : 0.0f;
      CHECK(out[i * K + k] == want, "dropout_rows value at (%lld, %lld)", (long long)i, (long long)k);
      CHECK(keep[i * K + k] == ref[k], "dropout_rows keep at (%lld, %lld)", (long long)i, (long long)k);
      kept += ref[k];
    }
  }
  const double frac = double(kept) / double(rows * K);
  CHECK(std::fabs(frac - (1.0 - p)) < 0.06, "kept fraction %g, expected about %g", frac, 1.0 - p);

  // masked accumulate into a row-strided destination (sd0 = K + 3)
  const int64_t sd0 = K + 3;
  std::vector<float> dst(rows * sd0), want(rows * sd0);
  for (int64_t i = 0; i < rows * sd0; ++i) dst[i] = want[i] = std::cos(0.11 * i);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t k = 0; k < K; ++k)
      if (keep[i * K + k]) want[i * sd0 + k] += out[i * K + k] * static_cast<float>(inv);
  lora_masked_accumulate<float, float>(out.data(), keep.data(), rows, K, inv, dst.data(), sd0);
  for (int64_t i = 0; i < rows * sd0; ++i) CHECK(std::fabs(dst[i] - want[i]) <= 1e-6f, "accumulate at %lld", (long long)i);

  // masked store (dst is overwritten, dropped elements become 0)
  std::vector<float> st(rows * sd0, 7.0f);
  lora_masked_store<float, float>(out.data(), keep.data(), rows, K, inv, st.data(), sd0);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t k = 0; k < K; ++k) {
      const float want_s = keep[i * K + k] ? out[i * K + k] * static_cast<float>(inv) : 0.0f;
      CHECK(st[i * sd0 + k] == want_s, "masked_store at (%lld, %lld)", (long long)i, (long long)k);
    }
    for (int64_t k = K; k < sd0; ++k) CHECK(st[i * sd0 + k] == 7.0f, "masked_store wrote past the row");
  }

  // bf16 input -> float output
  std::vector<bf16_t> xb(M * K);
  for (int64_t i = 0; i < M * K; ++i) xb[i] = from_float<bf16_t>(xt[i]);
  std::vector<float> outb(rows * K);
  lora_dropout_rows<bf16_t, float>(xb.data(), 1, M, row0, rows, K, seed, 0u, t, inv, outb.data(), nullptr);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t k = 0; k < K; ++k) {
      const float want_b = keep[i * K + k] ? to_float(xb[k * M + row0 + i]) * static_cast<float>(inv) : 0.0f;
      CHECK(outb[i * K + k] == want_b, "bf16 dropout_rows at (%lld, %lld)", (long long)i, (long long)k);
    }
}

int main() {
  test_keep_row();
  test_dropout_and_accumulate();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("lora_linear_test: all passed\n");
  return 0;
}
