// File I/O for emulation drivers (see harness.py): raw little-endian arrays and `name value` params.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

namespace emu_io {

struct Params {
  std::map<std::string, long long> values;
  long long operator[](const std::string& name) const {
    auto it = values.find(name);
    if (it == values.end()) {
      std::fprintf(stderr, "missing param %s\n", name.c_str());
      std::exit(2);
    }
    return it->second;
  }
  long long get(const std::string& name, long long fallback) const {
    auto it = values.find(name);
    return it == values.end() ? fallback : it->second;
  }
};

inline Params load_params(const std::string& dir) {
  Params p;
  std::ifstream f(dir + "/params.txt");
  std::string name;
  long long v;
  while (f >> name >> v) p.values[name] = v;
  return p;
}

template <class T>
std::vector<T> read(const std::string& dir, const std::string& name, size_t count) {
  std::vector<T> out(count);
  std::ifstream f(dir + "/" + name + ".bin", std::ios::binary);
  if (!f || !f.read(reinterpret_cast<char*>(out.data()), count * sizeof(T))) {
    std::fprintf(stderr, "cannot read %zu values of %s\n", count, name.c_str());
    std::exit(2);
  }
  return out;
}

template <class T>
void write(const std::string& dir, const std::string& name, const std::vector<T>& data) {
  std::ofstream f(dir + "/" + name + ".bin", std::ios::binary);
  f.write(reinterpret_cast<const char*>(data.data()), data.size() * sizeof(T));
}

}  // namespace emu_io
