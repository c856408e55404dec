#include <vector>
#include "scaled_add_cpu.h"
#include "../common/test_util.h"

using namespace fastpeft;

int main() {
  for (int64_t n : {0, 1, 7, 65537, 200003}) {
    std::vector<float> a(n), b(n), out(n);
    for (int64_t i = 0; i < n; ++i) { a[i] = 0.5f * (float)(i % 13) - 3.f; b[i] = (float)(i % 7) - 2.5f; }
    scaled_add_cpu(a.data(), b.data(), -1.25, out.data(), n);
    for (int64_t i = 0; i < n; ++i) EXPECT_NEAR(out[i], a[i] - 1.25f * b[i], 1e-6);
  }
  std::vector<bf16_t> a(5), b(5), out(5);
  for (int i = 0; i < 5; ++i) { a[i] = from_float<bf16_t>((float)i); b[i] = from_float<bf16_t>(1.0f); }
  scaled_add_cpu(a.data(), b.data(), 2.0, out.data(), 5);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(to_float(out[i]), (float)i + 2.0f);
  EXPECT_EQ(from_float<bf16_t>(1.0f).bits, 0x3f80);
  EXPECT_EQ(from_float<bf16_t>(1.00390625f).bits, 0x3f80);  // ties to even
  TEST_MAIN_END();
}
