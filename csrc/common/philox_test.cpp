// Known-answer tests: values produced by Triton's tl.philox and fastpeft/kernels/philox.py.
#include <cstdint>
#include <vector>
#include "philox.h"
#include "test_util.h"

using namespace fastpeft;

int main() {
  struct Case { uint64_t seed; uint32_t out[4]; };
  const Case cases[] = {
      {0ull, {3522976733u, 2522621249u, 727699955u, 834431153u}},
      {12345ull, {3875094715u, 2406494259u, 1745649445u, 1587205332u}},
      {(1ull << 40) + 17ull, {2033866859u, 1351805143u, 4289275585u, 1857050754u}},
  };
  for (const Case& c : cases) {
    Philox4 r = philox4x32(c.seed, 0u, 0u, 7u, 0u);
    for (int j = 0; j < 4; ++j) EXPECT_EQ(r.v[j], c.out[j]);
  }
  // Mask addressing: row 5 of a [7, 13] mask, p = 0.3, stream 2, seed 1.
  const uint8_t expect[13] = {0, 1, 0, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1};
  uint8_t keep[13];
  dropout_keep_row(1ull, 2u, 5, 13, dropout_threshold(0.3), keep);
  for (int j = 0; j < 13; ++j) EXPECT_EQ(keep[j], expect[j]);
  // bits of element (3, 8), seed 99, stream 1: lane 0 of counter (2, 3, 1, 0).
  EXPECT_EQ(philox4x32(99ull, 2u, 3u, 1u, 0u).v[0], 2202163314u);
  // Thresholds: p = 0 keeps all, p -> 1 drops all, kept fraction ~ 1 - p.
  EXPECT_EQ(dropout_threshold(0.0), 0u);
  EXPECT_EQ(dropout_threshold(1.0), 1u << 24);
  std::vector<uint8_t> row(100000);
  dropout_keep_row(7ull, 0u, 0, (int64_t)row.size(), dropout_threshold(0.25), row.data());
  double kept = 0;
  for (uint8_t k : row) kept += k;
  EXPECT_NEAR(kept / row.size(), 0.75, 0.01);  // ~7 standard deviations
  TEST_MAIN_END();
}
