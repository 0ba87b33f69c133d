// The CPU kernels' level is chosen the way ATen chooses its own (at::get_cpu_capability(), which
// reads the CPU and honours ATEN_CPU_CAPABILITY), capped by ALIGNOPS_CPU_ISA (which may only lower
// it) and by the levels this install compiled. The library of that level is opened with dlopen
// from beside alignops._C; the libraries of higher levels are never opened, so none of their code,
// static initialisers included, can run on a CPU without the instructions.
#include "cpu_isa.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <sstream>

#ifndef ALIGNOPS_CPU_ISAS
#error "ALIGNOPS_CPU_ISAS must list the compiled levels, e.g. default,avx2,avx512"
#endif

#define ALIGNOPS_STR_(...) #__VA_ARGS__
#define ALIGNOPS_STR(...) ALIGNOPS_STR_(__VA_ARGS__)

namespace alignops {
namespace {

const std::vector<std::string> kLevels = {"default", "avx2", "avx512"};

int level_of(const std::string& name) {
  auto it = std::find(kLevels.begin(), kLevels.end(), name);
  return it == kLevels.end() ? -1 : static_cast<int>(it - kLevels.begin());
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

// alignops/_C<suffix>.so -> alignops/_cpu_<isa><suffix>.so
std::string library_path(const std::string& isa, std::string* error) {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&cpu_isa), &info) == 0 || info.dli_fname == nullptr) {
    *error = "cannot locate alignops._C on disk (dladdr failed)";
    return "";
  }
  const std::string self = info.dli_fname;
  const size_t slash = self.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : self.substr(0, slash);
  const std::string base = slash == std::string::npos ? self : self.substr(slash + 1);
  if (base.rfind("_C", 0) != 0) {
    *error = "unexpected file name for alignops._C: " + self;
    return "";
  }
  return dir + "/_cpu_" + isa + base.substr(2);
}

CpuIsa load() {
  CpuIsa r;
  r.compiled = split(ALIGNOPS_STR(ALIGNOPS_CPU_ISAS));
  r.torch_capability = at::get_cpu_capability();
  const std::string cap = lower(r.torch_capability);
  int level = cap == "avx512" ? 2 : (cap == "avx2" ? 1 : 0);
  if (const char* env = std::getenv("ALIGNOPS_CPU_ISA"); env != nullptr && *env != '\0') {
    r.requested = lower(env);
    const int req = level_of(r.requested);
    if (req < 0) {
      r.error = "ALIGNOPS_CPU_ISA must be one of default, avx2, avx512; got '" + std::string(env) + "'";
      return r;
    }
    level = std::min(level, req);
  }
  // the highest compiled level not above the CPU's
  std::string isa;
  for (const auto& c : r.compiled)
    if (level_of(c) >= 0 && level_of(c) <= level && (isa.empty() || level_of(c) > level_of(isa))) isa = c;
  if (isa.empty()) {
    r.error = "no CPU kernel library was compiled for this CPU's level (compiled: " +
              std::string(ALIGNOPS_STR(ALIGNOPS_CPU_ISAS)) + ")";
    return r;
  }
  const std::string path = library_path(isa, &r.error);
  if (path.empty()) return r;
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    r.error = "cannot open " + path + ": " + (why ? why : "unknown error");
    return r;
  }
  using TableFn = const cpu::KernelTable* (*)();
  auto fn = reinterpret_cast<TableFn>(dlsym(handle, "alignops_cpu_kernel_table"));
  const cpu::KernelTable* table = fn ? fn() : nullptr;
  if (table == nullptr || table->version != cpu::kKernelTableVersion || isa != table->isa) {
    r.error = path + " is stale or foreign (kernel table version " +
              std::to_string(table ? table->version : -1) + ", expected " +
              std::to_string(cpu::kKernelTableVersion) + ")";
    return r;  // the handle stays open: closing a library with OpenMP threads is unsafe
  }
  r.chosen = isa;
  r.table = table;
  return r;
}

}  // namespace

const CpuIsa& cpu_isa() {
  static const CpuIsa state = load();
  return state;
}

const cpu::KernelTable& cpu_kernels() {
  const CpuIsa& s = cpu_isa();
  TORCH_CHECK(s.table != nullptr, "alignops_C: the CPU kernels could not be loaded: ", s.error);
  return *s.table;
}

}  // namespace alignops
