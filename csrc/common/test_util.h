// Minimal assertion helpers for the torch-free C++ unit tests (run by ctest).
#pragma once
#include <cmath>
#include <cstdio>
#include <cstdlib>

static int fastpeft_test_failures = 0;

#define EXPECT_TRUE(cond)                                                   \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond); \
      ++fastpeft_test_failures;                                             \
    }                                                                       \
  } while (0)

#define EXPECT_EQ(a, b) EXPECT_TRUE((a) == (b))
#define EXPECT_NEAR(a, b, tol) EXPECT_TRUE(std::fabs((double)(a) - (double)(b)) <= (tol))

#define TEST_MAIN_END()                                                     \
  do {                                                                      \
    if (fastpeft_test_failures) {                                           \
      std::fprintf(stderr, "%d check(s) failed\n", fastpeft_test_failures); \
      return 1;                                                             \
    }                                                                       \
    std::printf("ok\n");                                                    \
    return 0;                                                               \
  } while (0)
