// Constants of the base-2 softmax shared by the CPU and CUDA kernels (host, device and emulator
// code alike; no includes).
#pragma once

namespace pldr {

// log2(e): the query is pre-multiplied by scale·log2(e), so softmax weights are exp2(s − m).
constexpr float kLog2e = 1.4426950408889634f;
// ln(2): turns a base-2 log-sum-exp into the natural one. The CPU epilogue forms the LSE in fp64;
// CUDA code uses float(kLn2), the fp32 value nearest ln(2).
constexpr double kLn2 = 0.69314718055994530942;

}  // namespace pldr
