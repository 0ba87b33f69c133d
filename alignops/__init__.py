"""alignops: fused kernels for reinforcement-learning alignment of language models.

`import alignops` never initialises CUDA and never compiles anything: alignops._C and the Triton
kernels are loaded on first use.
"""

from alignops._backend import BACKENDS, BackendUnavailableError, available_backends
from alignops.token_stats import TokenLogprobs, token_logprobs
from alignops import advantages
from alignops.advantages import *  # noqa: F403 - the estimators listed in advantages.__all__
from alignops.policy import PolicyLossOutput, ValueLossOutput, fused_policy_loss, policy_loss, value_loss
from alignops.fused_linear import (fused_linear_policy_loss, fused_linear_sequence_logprobs,
                                   fused_linear_sft_loss, fused_linear_token_logprobs)
from alignops.preference import (PreferenceOutput, cpo_loss, dpo_loss, fused_linear_cpo_loss, fused_linear_kto_loss,
                                 fused_linear_simpo_loss, gvpo_loss, kto_loss, log1mexp, orpo_loss, rahf_loss,
                                 simpo_loss)
from alignops.distill import DistillOutput, distill_loss, fused_linear_distill_loss
from alignops.rollout_correction import RolloutCorrection, rollout_correction
from alignops.sft import (SequenceLogprobs, SFTOutput, chord_loss, chord_mu_schedule, iw_sft_weights,
                          sequence_logprobs, sft_loss)

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendUnavailableError", "available_backends", "token_logprobs", "TokenLogprobs",
           "sequence_logprobs", "SequenceLogprobs", "sft_loss", "SFTOutput", "iw_sft_weights", "chord_loss",
           "chord_mu_schedule", "dpo_loss", "orpo_loss", "gvpo_loss", "rahf_loss", "PreferenceOutput", "log1mexp",
           "policy_loss", "fused_policy_loss", "value_loss", "PolicyLossOutput", "ValueLossOutput",
           "fused_linear_token_logprobs", "fused_linear_policy_loss", "fused_linear_sequence_logprobs",
           "fused_linear_sft_loss", "simpo_loss", "cpo_loss", "kto_loss", "fused_linear_simpo_loss",
           "fused_linear_cpo_loss", "fused_linear_kto_loss"]
__all__ += ["rollout_correction", "RolloutCorrection"]
__all__ += ["distill_loss", "fused_linear_distill_loss", "DistillOutput"]
__all__ += advantages.__all__
