// Load-time choice of the CPU kernels' ISA level (see csrc/cpu/ops.h). Compiled into alignops._C
// without ISA flags.
#pragma once

#include <string>
#include <vector>

#include "cpu/ops.h"

namespace alignops {

struct CpuIsa {
  std::vector<std::string> compiled;  // levels built into this install, lowest first
  std::string torch_capability;       // at::get_cpu_capability(): honours ATEN_CPU_CAPABILITY
  std::string requested;              // ALIGNOPS_CPU_ISA, "" when unset
  std::string chosen;                 // "" when no library could be loaded
  std::string error;                  // why, when chosen is ""
  const cpu::KernelTable* table = nullptr;
};

// Chosen and loaded once, on first use (thread-safe).
const CpuIsa& cpu_isa();

// The chosen level's kernels; raises the loading error when there are none.
const cpu::KernelTable& cpu_kernels();

}  // namespace alignops
