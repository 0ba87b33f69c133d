// The one symbol an ISA library exports (see ops.h). ALIGNOPS_CPU_ISA_NAME is set by setup.py.
#include "ops.h"

#ifndef ALIGNOPS_CPU_ISA_NAME
#error "ALIGNOPS_CPU_ISA_NAME must name the ISA level this library is compiled for"
#endif

#define ALIGNOPS_STR_(x) #x
#define ALIGNOPS_STR(x) ALIGNOPS_STR_(x)

namespace {
const alignops::cpu::KernelTable kTable = {
    alignops::cpu::kKernelTableVersion,
    ALIGNOPS_STR(ALIGNOPS_CPU_ISA_NAME),
    &alignops::cpu::token_stats_fwd,
    &alignops::cpu::token_stats_bwd,
    &alignops::cpu::group_advantages,
    &alignops::cpu::masked_moments,
    &alignops::cpu::whiten_apply,
    &alignops::cpu::gae_scan,
    &alignops::cpu::policy_loss_fused,
    &alignops::cpu::distill_fwd,
    &alignops::cpu::distill_bwd,
};
}  // namespace

extern "C" __attribute__((visibility("default"))) const alignops::cpu::KernelTable* alignops_cpu_kernel_table() {
  return &kTable;
}
