// Run-time flag -> compile-time constant, for launching the template instance that matches
// (flash-attention's BOOL_SWITCH):
//
//   BOOL_SWITCH(aligned, kAligned, [&] { kernel<scalar_t, kAligned><<<grid, block, 0, stream>>>(...); });
//
// Both instances are compiled; the branch picks one at launch.
#pragma once

#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()
