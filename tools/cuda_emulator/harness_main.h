// The shared main() of the harnesses. A case file (argv[1]) holds `header_words` int64 words
// (the first is the dtype code: 0 float32, 1 float64, 2 bfloat16, 3 float16), the temperature
// as a double, then the case body; the harness writes its outputs to argv[2].
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <vector>

// run(scalar_t{}, body, header, temperature, out) for the case's dtype.
template <class Run>
int harness_main(int argc, char** argv, int header_words, Run run) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s CASE_IN CASE_OUT\n", argv[0]);
    return 2;
  }
  std::ifstream in(argv[1], std::ios::binary);
  const std::vector<char> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const int64_t* header = reinterpret_cast<const int64_t*>(data.data());
  double temperature;
  std::memcpy(&temperature, data.data() + header_words * 8, 8);
  const char* body = data.data() + (header_words + 1) * 8;
  FILE* out = std::fopen(argv[2], "wb");
  switch (header[0]) {
    case 0: run(float{}, body, header, temperature, out); break;
    case 1: run(double{}, body, header, temperature, out); break;
    case 2: run(__nv_bfloat16{}, body, header, temperature, out); break;
    case 3: run(__half{}, body, header, temperature, out); break;
    default: std::fprintf(stderr, "unknown dtype code %ld\n", long(header[0])); return 2;
  }
  std::fclose(out);
  return 0;
}
