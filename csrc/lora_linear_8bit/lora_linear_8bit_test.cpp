// Unit test of dequant8_rows: every element of odd-sized weights, whole and split into two row tiles,
// against the formula q * fl32(scale * fl32(1/127)), computed in float (rounded to float and bf16)
// and in double.
#include <vector>
#include "lora_linear_8bit_cpu.h"
#include "../common/test_util.h"

using namespace fastpeft;

int main() {
  const float inv127 = static_cast<float>(1.0 / 127.0);
  for (int64_t N : {1, 3, 7, 13}) {
    for (int64_t K : {1, 2, 5, 31, 64, 67}) {
      const int64_t n = N * K;
      std::vector<int8_t> q(n);
      for (int64_t i = 0; i < n; ++i) q[i] = static_cast<int8_t>(((i * 37 + 11) % 255) - 127);
      std::vector<float> s(N);
      for (int64_t r = 0; r < N; ++r) s[r] = 0.3f + 1.7f * (float)r;
      auto expected = [&](int64_t e) { return static_cast<float>(q[e]) * (s[e / K] * inv127); };
      std::vector<float> out(n, -99.f);
      dequant8_rows<float>(q.data(), s.data(), K, 0, N, out.data());
      for (int64_t e = 0; e < n; ++e) EXPECT_EQ(out[e], expected(e));
      const int64_t r0 = N / 2;
      std::vector<double> tile((N - r0) * K);
      dequant8_rows<double>(q.data(), s.data(), K, r0, N - r0, tile.data());
      for (int64_t e = r0 * K; e < n; ++e)
        EXPECT_EQ(tile[e - r0 * K], static_cast<double>(q[e]) * static_cast<double>(s[e / K] * inv127));
      std::vector<bf16_t> hb(n);
      dequant8_rows<bf16_t>(q.data(), s.data(), K, 0, N, hb.data());
      for (int64_t e = 0; e < n; ++e) EXPECT_EQ(hb[e].bits, from_float<bf16_t>(expected(e)).bits);
    }
  }
  TEST_MAIN_END();
}
