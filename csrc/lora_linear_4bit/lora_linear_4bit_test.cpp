// Unit test of dequant4_rows: every row of odd-sized weights (rows that start in a low nibble, an odd
// element at either end) against the element-by-element formula, for several blocksizes and tile splits.
#include <vector>
#include "lora_linear_4bit_cpu.h"
#include "../common/test_util.h"

using namespace fastpeft;

static float expected(const std::vector<uint8_t>& q, const std::vector<float>& absmax, const float* code,
                      int64_t e, int64_t bs) {
  const uint8_t b = q[e / 2];
  const int nib = (e % 2 == 0) ? (b >> 4) : (b & 15);
  return code[nib] * absmax[e / bs];
}

int main() {
  float code[16];
  for (int i = 0; i < 16; ++i) code[i] = -1.0f + 2.0f * i / 15.0f;
  for (int64_t N : {1, 3, 7, 13}) {
    for (int64_t K : {1, 2, 5, 31, 64, 67}) {
      for (int lb : {5, 6, 8}) {
        const int64_t bs = int64_t(1) << lb, n = N * K, nb = (n + bs - 1) / bs;
        std::vector<uint8_t> q((n + 1) / 2);
        for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<uint8_t>((i * 37 + 11) & 255);
        std::vector<float> absmax(nb);
        for (int64_t b = 0; b < nb; ++b) absmax[b] = 0.25f + 0.5f * (float)b;
        // whole weight, then split in two tiles of rows
        std::vector<float> out(n, -99.f);
        dequant4_rows<float>(q.data(), absmax.data(), code, K, lb, 0, N, out.data());
        for (int64_t e = 0; e < n; ++e) EXPECT_EQ(out[e], expected(q, absmax, code, e, bs));
        const int64_t r0 = N / 2;
        std::vector<double> tile((N - r0) * K);
        dequant4_rows<double>(q.data(), absmax.data(), code, K, lb, r0, N - r0, tile.data());
        for (int64_t e = r0 * K; e < n; ++e) EXPECT_EQ(tile[e - r0 * K], (double)expected(q, absmax, code, e, bs));
        std::vector<bf16_t> hb(n);
        dequant4_rows<bf16_t>(q.data(), absmax.data(), code, K, lb, 0, N, hb.data());
        for (int64_t e = 0; e < n; ++e)
          EXPECT_EQ(hb[e].bits, from_float<bf16_t>(expected(q, absmax, code, e, bs)).bits);
      }
    }
  }
  TEST_MAIN_END();
}
